import { spawn, type ChildProcess } from 'node:child_process';
import type { IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';

/**
 * `pods/NAME/portforward` over WebSocket, as the kubelet serves it: subprotocol
 * `v4.channel.k8s.io` (or none), two channels per requested port (2i data, 2i+1 error), each
 * opened by the server with the port as 2 bytes little-endian. For every port a small relay
 * process runs inside the pod's netns (what kubelet does with nsenter and socat) and connects to
 * 127.0.0.1:PORT there; bytes flow both ways with backpressure: a slow client pauses the relay,
 * a slow target pauses the WebSocket. When the target closes its side the WebSocket is closed
 * (as the kubelet closes the stream); when the client goes, the target sees EOF.
 */

export const PORT_FORWARD_PROTOCOL = 'v4.channel.k8s.io';

export interface PortForwardTarget {
  podName: string;
  uid: string;
  netns: string;
  ports: number[];
}

/** Runs in the pod's netns: a TCP connection to the port, spliced onto stdin/stdout. */
const RELAY = `
const socket = require('net').connect({ host: '127.0.0.1', port: Number(process.argv[1]) });
socket.once('connect', () => {
  process.stdin.pipe(socket);
  socket.pipe(process.stdout);
});
socket.once('error', (error) => {
  process.stderr.write(error.code === 'ECONNREFUSED' ? 'connect: connection refused' : error.message);
  process.exit(1);
});
`;

/** Above this many bytes waiting in the WebSocket, the relay stops being read. */
const HIGH_WATER = 1024 * 1024;
const RELAY_LINGER_MS = 2_000;

export class PortForwarder {
  readonly #server = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    handleProtocols: (protocols) =>
      protocols.has(PORT_FORWARD_PROTOCOL) ? PORT_FORWARD_PROTOCOL : false,
  });
  readonly #relays = new Set<ChildProcess>();

  /** Whether the client offers a subprotocol this endpoint speaks (or none at all). */
  static acceptsProtocols(req: IncomingMessage): boolean {
    const header = req.headers['sec-websocket-protocol'];
    if (!header) return true;
    return header.split(',').some((p) => p.trim() === PORT_FORWARD_PROTOCOL);
  }

  handleUpgrade(
    req: IncomingMessage,
    socket: Duplex,
    head: Buffer,
    target: PortForwardTarget,
  ): void {
    this.#server.handleUpgrade(req, socket, head, (ws) => this.#forward(ws, target));
  }

  close(): void {
    for (const client of this.#server.clients) client.terminate();
    for (const relay of this.#relays) relay.kill('SIGKILL');
    this.#server.close();
  }

  #forward(ws: WebSocket, target: PortForwardTarget): void {
    let open = target.ports.length;
    const relays: ChildProcess[] = [];
    const blocked = new Set<number>();

    target.ports.forEach((port, index) => {
      const dataChannel = index * 2;
      const errorChannel = dataChannel + 1;
      const portBytes = Buffer.from([port & 0xff, port >> 8]);
      ws.send(Buffer.concat([Buffer.from([dataChannel]), portBytes]));
      ws.send(Buffer.concat([Buffer.from([errorChannel]), portBytes]));

      const relay = spawn(
        'nsenter',
        [`--net=/run/netns/${target.netns}`, '--', process.execPath, '-e', RELAY, String(port)],
        { stdio: ['pipe', 'pipe', 'pipe'] },
      );
      relays[index] = relay;
      this.#relays.add(relay);
      let stderr = '';
      relay.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
      relay.stdin!.on('error', () => undefined);
      relay.stdout!.on('data', (chunk: Buffer) => {
        if (ws.readyState !== ws.OPEN) return;
        ws.send(Buffer.concat([Buffer.from([dataChannel]), chunk]), () => {
          if (relay.stdout!.isPaused() && ws.bufferedAmount < HIGH_WATER / 2)
            relay.stdout!.resume();
        });
        if (ws.bufferedAmount >= HIGH_WATER) relay.stdout!.pause();
      });
      relay.once('close', (code) => {
        this.#relays.delete(relay);
        if (code !== 0 && ws.readyState === ws.OPEN) {
          const reason = stderr.trim() || 'lost connection to the pod';
          const message = `error forwarding port ${port} to pod ${target.podName}, uid ${target.uid}: failed to connect to localhost:${port} inside namespace "${target.netns}": dial tcp4 127.0.0.1:${port}: ${reason}`;
          ws.send(Buffer.concat([Buffer.from([errorChannel]), Buffer.from(message)]));
        }
        open -= 1;
        // Like the kubelet: the stream is closed once forwarding ended on every port.
        if (open === 0 && ws.readyState === ws.OPEN) ws.close(1000);
      });
    });

    ws.on('message', (data: Buffer) => {
      const channel = data[0];
      if (channel === undefined || channel % 2 !== 0) return;
      const relay = relays[channel / 2];
      if (!relay || data.length === 1 || !relay.stdin!.writable) return;
      if (!relay.stdin!.write(data.subarray(1))) {
        blocked.add(channel);
        ws.pause();
        relay.stdin!.once('drain', () => {
          blocked.delete(channel);
          if (blocked.size === 0) ws.resume();
        });
      }
    });
    ws.once('close', () => {
      // The client is gone: the target sees EOF, and the relay gets a moment to pass on what
      // is still in flight before it is killed.
      for (const relay of relays) {
        relay.stdin!.end();
        setTimeout(() => relay.kill('SIGKILL'), RELAY_LINGER_MS).unref();
      }
    });
    ws.on('error', () => ws.terminate());
  }
}
