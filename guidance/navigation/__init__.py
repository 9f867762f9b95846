"""Navigation: tracked instruments in the CT, guidance metrics, overlays and the screen."""
