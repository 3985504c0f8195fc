"""What the edges report (the observer protocol) and its structlog and Prometheus sinks."""
