"""OpenAI-compatible HTTP server (`unimlm serve`): FastAPI + uvicorn over one Engine. Needs the `serve`
extra (fastapi, uvicorn, prometheus_client)."""
from .app import ServerConfig, build_app
from .serve import make_server, serve, start_in_thread

__all__ = ["ServerConfig", "build_app", "make_server", "serve", "start_in_thread"]
