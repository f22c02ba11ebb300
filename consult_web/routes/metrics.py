"""``GET /metrics``: the Prometheus text exposition of :class:`xray_triage.metrics.Metrics`.

Access: an **admin** user, by bearer token (``xray-triage tokens create`` for an
admin account, set as the scraper's ``authorization`` credentials) or by a browser
login. Not open to loopback: behind a reverse proxy every request comes from
127.0.0.1. The metrics hold no patient data (station AE titles, counts, times),
but queue sizes and station names are still the site's business.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consult_web.deps import AdminUser

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, _admin: AdminUser) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
