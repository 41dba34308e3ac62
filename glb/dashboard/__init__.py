"""`glb dashboard`: a live web page of the whole deployment (docs/dashboard.md).

``model`` is the pure core (view, samples, timeline), ``actions`` the one
adapter to the admin API, ``server`` the aiohttp shell; ``static/`` holds the
page and its vendored chart library.
"""
