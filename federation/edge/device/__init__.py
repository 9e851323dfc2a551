"""The device side of the edge broker: what a phone runs.

``client`` enrolls a device, keeps its credentials and channels, and uploads files
resumably; ``agent`` is the long-running loop that heartbeats, takes jobs and
reports their results; ``jobs`` runs each job kind. Nothing here runs on the
federation's own machines.
"""
