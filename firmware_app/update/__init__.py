"""Signed model updates from a USB stick: verify, self-test, install atomically, roll back.

- ``bundle``: the .fwb format, read strictly (an attacker controls every byte), and written by the tools
- ``trust``: the trusted keys in ``<data-dir>/keys/``, key rotation, revocation, expiry
- ``slots``: ``<data-dir>/models/<id>/`` with slots a/b, the ``current`` pointer and the sequence floor
- ``selftest``: golden vectors on the board's backend
- ``install``: copy, verify, self-test, switch; rollback; the boot check against crash loops
- ``staging``: the stick -> staging/ copy (udev, root) and the daemon's pickup of staged bundles
- ``commands``: what ``firmware-app update|selftest|models rollback|audit verify`` call

Nothing is imported here, so that ``python -m firmware_app.update.staging`` (run as root) stays small.
"""
