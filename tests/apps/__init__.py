"""Small applications the middleware tests and benchmarks serve (hello.py,
killable.py, flask_app.py, asgi_app.py, django_app.py) and the harness that
runs them under real servers (harness.py)."""
