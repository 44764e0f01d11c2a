"""How fast a benchmark client gets N concurrent streams to a server: httpx against aiohttp.

    python tests/benchmarks/client_ingest.py [--streams 1500] [--chunks 100]

Starts a plain Starlette SSE server (uvicorn, in a child process) that notes when each request
arrives and then streams `--chunks` completion chunks 20 ms apart; sends `--streams` streaming
requests at once, first with httpx (what `pdserve bench` used before), then with aiohttp through
pdserve.bench.client.send_request (what it uses now). Prints, per client, when the first and
median requests reached the server and the median first token. Why it exists: on the H200 the
all-at-once load's last requests reached the gateway only as earlier ones finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SERVER = r'''
import asyncio, json, sys, time
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
ARRIVALS = []
async def completions(request):
    body = await request.json()
    ARRIVALS.append(time.time())
    async def chunks():
        for _ in range(body["max_tokens"]):
            await asyncio.sleep(0.02)
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": " w", "finish_reason": None}]}) + "\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(chunks(), media_type="text/event-stream")
async def arrivals(request):
    return JSONResponse(ARRIVALS)
app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/arrivals", arrivals)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


async def httpx_streams(url: str, n: int, payload: dict) -> list[float]:
    import httpx

    async def one(client) -> float:
        start = time.perf_counter()
        async with client.stream("POST", url, json=payload) as response:
            async for _ in response.aiter_bytes():
                return time.perf_counter() - start
        return float("nan")

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600), trust_env=False) as client:
        return await asyncio.gather(*[one(client) for _ in range(n)])


async def aiohttp_streams(url: str, n: int, payload: dict) -> list[float]:
    from pdserve.bench.client import send_request, stream_session

    async with stream_session(None) as session:
        records = await asyncio.gather(*[send_request(session, url, payload, i, 1, 600) for i in range(n)])
    return [r.ttft if r.ttft is not None else float("nan") for r in records]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=1500)
    p.add_argument("--chunks", type=int, default=100)
    args = p.parse_args()
    from tests.service_fixture import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        import httpx

        for _ in range(100):
            try:
                httpx.get(f"{base}/arrivals", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        payload = {"model": "m", "prompt": "hi", "max_tokens": args.chunks, "stream": True}
        for name, run in (("httpx", httpx_streams), ("aiohttp", aiohttp_streams)):
            seen = len(httpx.get(f"{base}/arrivals", timeout=10).json())
            t0 = time.time()
            ttfts = asyncio.run(run(f"{base}/v1/completions", args.streams, payload))
            arrivals = sorted(a - t0 for a in httpx.get(f"{base}/arrivals", timeout=10).json()[seen:])
            print(json.dumps({"client": name, "streams": args.streams, "first_arrival_s": round(arrivals[0], 2),
                              "median_arrival_s": round(arrivals[len(arrivals) // 2], 2),
                              "median_first_token_s": round(statistics.median(ttfts), 2)}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
