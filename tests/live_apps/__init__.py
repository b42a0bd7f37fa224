"""Small WSGI applications that the live tests serve with a real gunicorn."""
