"""The deploy files (docker-compose, Kubernetes, Grafana dashboards, alert rules), generated from the code.

``relay deploy render`` writes them; a test checks the committed files are what the code generates, so a new
target (one line in ``services/common/targets.py``) reaches every deploy file with no hand edit.
"""
