"""The farm's HTTP API: a Ray Serve ingress in front of the controller, for clients without Ray.

    POST   /v1/renders               {"spec": {...}, "priority": 0, "metadata": true} -> 201 {"id", "seed"}
    GET    /v1/renders/{id}          state, progress per stage, timings
    GET    /v1/renders/{id}/events   Server-Sent Events: `data: {json}` at each change of state or progress,
                                     the last one done, failed or canceled
    GET    /v1/renders/{id}/image    the PNG (409 until the render is done, 410 once it expired)
    DELETE /v1/renders/{id}          cancel (a running render stops at its next task)

With an API key configured every request needs `Authorization: Bearer KEY`; the farm refuses to listen
anywhere but the loopback without one. Specs may only name files under the farm's model roots.
"""

import asyncio
import hmac
import json
from pathlib import Path

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from cluster.farm_names import CONTROLLER, NAMESPACE
from cluster.queue import FINAL, expired_message
from pipeline.errors import UserError

APP_NAME = "tilefarm-api"
EVENTS_POLL_S = 0.2  # how often an event stream asks the controller how its render is going
EVENT_KEYS = ("id", "state", "priority", "progress", "error", "started", "finished", "expired")
app = FastAPI(title="tilefarm", description=__doc__)


@app.exception_handler(UserError)
async def _refused(request: Request, err: UserError) -> JSONResponse:
    from cluster.remote_spec import Forbidden  # here, not at the top: `farm down` loads this module to stop the API

    return JSONResponse({"error": str(err)}, status_code=403 if isinstance(err, Forbidden) else 400)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class FarmApi:
    """One replica: every call goes to the controller, which owns the queue."""

    def __init__(self, api_key: str, roots: list[str]):
        self.api_key = api_key
        self.roots = [Path(r) for r in roots]

    def _check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(401, "this farm needs its API key: send `Authorization: Bearer KEY`")

    def _controller(self):
        try:
            return ray.get_actor(CONTROLLER, namespace=NAMESPACE)
        except ValueError:
            raise HTTPException(503, "the farm is down; `farm up` starts it") from None

    async def _record(self, render_id: int) -> dict:
        record = await self._controller().status.remote(render_id)
        if record is None:
            raise HTTPException(404, f"the farm has no render {render_id}")
        return record

    @app.post("/v1/renders", status_code=201)
    async def submit(self, request: Request) -> dict:
        from cluster.remote_spec import check_remote_spec
        from farm.executor import prepare

        self._check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, 'the request body must be JSON: {"spec": {...}, "priority": 0}') from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the request body must be a JSON object with a 'spec'")
        spec = check_remote_spec(body.get("spec"), self.roots)
        plan = prepare(spec, "cpu", cluster=True)  # every check a local render makes; draws the seed
        priority, threads = body.get("priority", 0), body.get("cpu_threads", 0)
        if not isinstance(priority, int) or not isinstance(threads, int) or threads < 0:
            raise HTTPException(400, "'priority' must be a whole number, 'cpu_threads' a whole number >= 0")
        options = {"cpu_threads": threads, "metadata": bool(body.get("metadata", True))}
        try:
            render_id = await self._controller().submit.remote(plan.spec.to_dict(), options, priority)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, UserError):
                raise HTTPException(503, str(err.cause)) from None
            raise
        return {"id": render_id, "seed": plan.spec.seed}

    @app.get("/v1/renders/{render_id}")
    async def status(self, render_id: int, request: Request) -> dict:
        self._check_key(request)
        record = await self._record(render_id)
        record.pop("result", None)  # a path on the farm's node: of no use to a remote client
        return record

    @app.get("/v1/renders/{render_id}/events")
    async def events(self, render_id: int, request: Request) -> StreamingResponse:
        self._check_key(request)
        await self._record(render_id)  # 404 before the stream starts

        async def stream():
            last = None
            while not await request.is_disconnected():
                try:
                    record = await self._controller().status.remote(render_id)
                except ray.exceptions.RayActorError:  # the controller restarts: its queue comes back with it
                    await asyncio.sleep(EVENTS_POLL_S)
                    continue
                except HTTPException as err:  # the farm went down
                    yield f"event: error\ndata: {json.dumps({'id': render_id, 'error': err.detail})}\n\n"
                    return
                event = {k: record.get(k) for k in EVENT_KEYS}
                if event != last:
                    if record["state"] in FINAL:
                        event["stats"] = record["stats"]
                    yield f"data: {json.dumps(event)}\n\n"
                    last = event
                if record["state"] in FINAL:
                    return
                await asyncio.sleep(EVENTS_POLL_S)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies pass events on at once
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/renders/{render_id}/image")
    async def image(self, render_id: int, request: Request) -> Response:
        self._check_key(request)
        record = await self._record(render_id)
        if record["state"] != "done":
            raise HTTPException(409, f"render {render_id} is {record['state']}: the image comes when it is done")
        if record.get("expired"):
            raise HTTPException(410, expired_message(record))
        data = await self._controller().image.remote(render_id)
        return Response(data, media_type="image/png")

    @app.delete("/v1/renders/{render_id}")
    async def cancel(self, render_id: int, request: Request) -> dict:
        self._check_key(request)
        await self._record(render_id)
        was = await self._controller().cancel.remote(render_id)
        return {"id": render_id, "was": was}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def start_api(host: str, port: int, api_key: str, roots: list[str]) -> str:
    """Start Serve's proxy on host:port and deploy the API; returns its base URL."""
    if host not in LOOPBACK and not api_key:
        raise UserError(
            f"--http-host {host}: the HTTP API listens beyond this machine only with a key; "
            "pass --api-key-file FILE (clients send `Authorization: Bearer KEY`)"
        )
    missing = [r for r in roots if not Path(r).is_dir()]
    if missing:
        raise UserError(f"--model-root {', '.join(missing)}: not a folder on this node")
    serve.start(http_options={"host": host, "port": port})
    serve.run(FarmApi.bind(api_key, [str(Path(r).resolve()) for r in roots]), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/v1/renders"


def stop_api() -> None:
    """Remove the API app; Serve itself goes too when no other app uses it."""
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"}
    if not any("CONTROLLER" in n for n in names):
        return  # Serve is not running: nothing to remove
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
