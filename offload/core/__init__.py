"""The pure core: the wire protocol, the websocket protocol state machine, the
resume cursor and the channel session. No socket, gevent, uWSGI, Redis or Django
here (tests/test_architecture.py checks it): everything is tested without I/O."""
