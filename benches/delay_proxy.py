#!/usr/bin/env python3
"""A TCP proxy on loopback that delays every byte by half a round trip each
way: agents behind it see the coordinator as if it were on another network
(another region or cloud), which loopback alone never shows.

Usage: delay_proxy.py LISTEN_PORT TARGET_PORT RTT_MS
"""
import asyncio
import socket
import sys


async def pipe(reader, writer, delay):
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            # Delayed, not slowed: later reads are forwarded on their own
            # schedule, so requests in flight overlap as they would on a link.
            loop.call_later(delay, writer.write, data)
    finally:
        await asyncio.sleep(2 * delay)
        writer.close()


async def main(listen, target, delay):
    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        for w in (client_w, server_w):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pipe(client_r, server_w, delay), pipe(server_r, client_w, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: delay_proxy.py LISTEN_PORT TARGET_PORT RTT_MS")
    listen, target, rtt_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(main(listen, target, rtt_ms / 2000))
