"""The dashboard's pages: each module is a Streamlit page script with a ``render(ctx)``."""
