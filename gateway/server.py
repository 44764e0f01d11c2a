"""`pdserve gateway`: the Starlette app on uvicorn, bridged to the pipeline's sockets."""

from __future__ import annotations

import logging

import uvicorn

from gateway.app import GatewayApp
from gateway.engine_client import EngineClient
from protocol.config import GatewaySettings, LaunchSettings, ModelSettings, StageSettings
from protocol.endpoints import Endpoints

log = logging.getLogger("pdserve.gateway")


async def serve_gateway(model: ModelSettings, gw: GatewaySettings, launch: LaunchSettings,
                        stage: StageSettings, endpoints: Endpoints) -> None:
    client = EngineClient(endpoints, stage.liveness_timeout)
    await client.start()
    served = gw.served_model_name or model.model
    app = GatewayApp(client, gw, launch, served, model.model).build()
    config = uvicorn.Config(app, host=gw.host, port=gw.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        await server.serve()
    finally:
        server.should_exit = True
        await client.stop()
