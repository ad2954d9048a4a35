"""The read-only status console: one server-rendered page (Starlette + Jinja2, charts
as inline SVG) and the Prometheus ``/metrics`` endpoint, served by ``serve`` when
``[console] enabled = true``.  It reads the job database through :mod:`node.status`
and holds no state of its own."""
