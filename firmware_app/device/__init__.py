"""The box's own hardware, outside the imaging data flow: buttons and lights (``gpio``), the serial line to a
monitor (``serial_link``) and the service manager (``sdnotify``).

Each piece talks to the daemon only through ``controls.Controls`` (what a button or a serial command may do)
and the pipeline's result listeners ``(frame, result)``; each has a real implementation and a test double
(gpiozero's MockFactory, pyserial's ``loop://``, a datagram socket), so no test needs hardware.
gpiozero and pyserial are optional (extras ``gpio`` and ``serial``): they are imported only by the module
that needs them.
"""
