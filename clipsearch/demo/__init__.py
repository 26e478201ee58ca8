"""The bundled demo: the shapes renderer, the demo catalogue and its checkpoint (data/demo.pt)."""
