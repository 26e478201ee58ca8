"""The HTTP edge: the one route table (routes, served by the search Lambda and locally) and the local server."""
