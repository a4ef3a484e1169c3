"""`python -m engine.serve`: the BSSAN search service (FastAPI + uvicorn), its page and its gallery.

    python -m engine.serve --model build/artifacts/reference --gallery photos/ --captions captions.txt \
        [--host 127.0.0.1 --port 8080] [--index-kind flat|hnsw|ivf] [--batching on|off] [--api-key-file KEY]

Modules, one per stage: index.py (FAISS first stage), gallery.py (persistent gallery: snapshot +
fsynced append log, background compaction), records.py (the log's record format), service.py
(two-stage ranking without HTTP), batching.py (micro-batching), metrics.py (Prometheus), state.py
(what a running service holds), app.py (the FastAPI app), __main__.py (the command),
static/index.html (the search page). Needs the `serve` extra:
pip install 'bssan-engine[serve]'. `import engine` never imports this package.
"""
