"""The module-level names every blueprint imports: the extension and the registry handle.

Neither holds an app: ``create_app()`` calls ``datastar.init_app(app)``, which
gives that app its own registry behind ``voters``.
"""

from __future__ import annotations

from flask_datastar import FlaskDatastar

datastar = FlaskDatastar()

#: Every open tab. ``voters.register``, ``voters.broadcast`` and the other
#: registry methods act on the registry of the app serving the request.
voters = datastar.registry_handle("poll")
