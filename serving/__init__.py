"""The web server behind serve.py (the command), one home per job:

    engine.py       decoding and continuous batching (a worker thread per model), no HTTP
    protocol.py     the HTTP side both APIs share: the JSON error, request bodies and field checks, SSE
    native.py       the native API and the page: /, /health, /api/models, /api/summarize, /api/examples, /api/report
    openai_api.py   the OpenAI-compatible API: /v1/models, /v1/completions
    app.py          create_app: FastAPI with the static files, the error handlers and the two routers
    static/         the page (plain HTML, CSS and JavaScript)
"""
