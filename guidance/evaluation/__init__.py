"""Registration evaluation: metrics, benchmark sets, runners and reports."""
