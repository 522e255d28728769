"""The connections a session runs on: websockets (uWSGI's handshake, our
protocol loop) and event streams, on gevent. They depend on the core and the
backend; the Django edge (views, wsgi) creates them."""
