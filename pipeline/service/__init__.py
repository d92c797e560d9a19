"""Service: the HTTP search service (FastAPI app, web page, audio streaming, metrics) over a retrieval index."""
