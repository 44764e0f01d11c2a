"""`pdserve gateway`: the Starlette app on uvicorn, bridged to the pipeline's sockets.

On SIGTERM/SIGINT uvicorn stops accepting connections and waits for open responses; before that
wait, every open request is ended with a 503 error (an SSE error event and `[DONE]` for a
stream, a JSON error body otherwise), so no client is cut without a word and shutdown is quick.
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from gateway.app import GatewayApp
from gateway.engine_client import EngineClient
from protocol.config import GatewaySettings, LaunchSettings, ModelSettings, StageSettings
from protocol.endpoints import Endpoints

log = logging.getLogger("pdserve.gateway")


class _EndingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown first ends every open request with an error."""

    def __init__(self, config: uvicorn.Config, client: EngineClient) -> None:
        super().__init__(config)
        self.client = client

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.client.streams:
            log.info("shutting down: ending %d open request(s) with an error", len(self.client.streams))
        self.client.fail_all(503, "pdserve is shutting down; the request was not finished")
        await super().shutdown(sockets)


async def serve_gateway(model: ModelSettings, gw: GatewaySettings, launch: LaunchSettings,
                        stage: StageSettings, endpoints: Endpoints) -> None:
    client = EngineClient(endpoints, stage.liveness_timeout)
    await client.start()
    served = gw.served_model_name or model.model
    app = GatewayApp(client, gw, launch, served, model.model).build()
    config = uvicorn.Config(app, host=gw.host, port=gw.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = _EndingServer(config, client)
    try:
        await server.serve()
    finally:
        server.should_exit = True
        await client.stop()
