import { spawn, type ChildProcess } from 'node:child_process';
import type { IncomingMessage } from 'node:http';
import { Socket, type ConnectOpts, type SocketConstructorOpts } from 'node:net';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';

/**
 * `pods/NAME/portforward` over WebSocket, as the kubelet serves it: subprotocol
 * `v4.channel.k8s.io` (or none), two channels per requested port (2i data, 2i+1 error), each
 * opened by the server with the port as 2 bytes little-endian. As containerd does for the
 * kubelet, the connection to 127.0.0.1:PORT is made inside the pod's netns and the bytes are
 * copied in the server itself: a small dialer process started in the netns (nsenter) connects
 * and hands the connected socket over (file descriptors do not belong to a netns), so no
 * process stands between the WebSocket and the pod. The dialer then waits, idle, for the
 * connection to end: killing it cuts the forward's connection, as a kubelet losing it would.
 * The server reads the pod's bytes into a few buffers of its own and writes them on from there,
 * as Go's io.Copy does for the kubelet: a socket's default reads allocate a fresh 64 KiB buffer
 * each, and at loopback speed that churn made V8 run a full GC after nearly every scavenge
 * ("external memory pressure"), which halved the throughput of whole runs.
 * Bytes flow both ways with backpressure: a slow client pauses the pod's socket, a slow target
 * pauses the WebSocket. When the target closes its side the WebSocket is closed (as the kubelet
 * closes the stream); when the client goes, the target sees EOF.
 */

export const PORT_FORWARD_PROTOCOL = 'v4.channel.k8s.io';

export interface PortForwardTarget {
  podName: string;
  uid: string;
  netns: string;
  ports: number[];
}

/**
 * Runs in the pod's netns: connects to the port and sends the connected socket to the API
 * server over the IPC channel, without reading a byte of it; then stays until disconnected.
 * It sends the bare handle rather than the net.Socket, so that the server can wrap it with its
 * own read buffers (a net.Socket arrives already reading into buffers of Node's); the dialer's
 * copy of the descriptor is closed once sent, which leaves the connection to the server.
 */
const DIALER = `
const socket = require('net').connect({ host: '127.0.0.1', port: Number(process.argv[1]) });
socket.pause();
socket.once('connect', () =>
  process.send({ connected: true }, socket._handle, () => socket.destroy()),
);
socket.once('error', (error) => {
  const reason = error.code === 'ECONNREFUSED' ? 'connect: connection refused' : error.message;
  process.send({ error: reason }, () => process.exit(1));
});
process.once('disconnect', () => process.exit(0));
`;

type DialAnswer = { connected: true } | { error: string };

/** How many bytes of the pod's stream one read takes at most. */
const READ_BYTES = 64 * 1024;
/** Room before the read bytes for the longest frame header: 10 bytes and the channel byte. */
const HEADER_ROOM = 11;
/** With this many read buffers waiting in the WebSocket (1 MiB), the pod's socket stops being read. */
const MAX_BUFFERS_IN_FLIGHT = 16;
/** How long a connection whose client is gone may still pass on what is in flight. */
const LINGER_MS = 2_000;

/**
 * Turns the `length` bytes read into `frameBuffer` just after its {@link HEADER_ROOM} into one
 * unmasked, final, binary WebSocket frame on `channel`, by writing the header into the room in
 * front of them; returns the frame. So a chunk from the pod is framed without being copied,
 * and written straight to the connection rather than through ws.send, which would copy it twice
 * more. ws writes its own frames (close, pong) to the same connection synchronously, so order
 * holds.
 */
function frameInPlace(frameBuffer: Buffer, channel: number, length: number): Buffer {
  const payload = 1 + length;
  const headerSize = payload < 126 ? 2 : payload < 0x10000 ? 4 : 10;
  const start = HEADER_ROOM - 1 - headerSize;
  frameBuffer[start] = 0x82;
  if (headerSize === 2) {
    frameBuffer[start + 1] = payload;
  } else if (headerSize === 4) {
    frameBuffer[start + 1] = 126;
    frameBuffer.writeUInt16BE(payload, start + 2);
  } else {
    frameBuffer[start + 1] = 127;
    frameBuffer.writeBigUInt64BE(BigInt(payload), start + 2);
  }
  frameBuffer[HEADER_ROOM - 1] = channel;
  return frameBuffer.subarray(start, HEADER_ROOM + length);
}

/** Go's wording for a failed read, as the kubelet's error channel carries it. */
function readFailure(localPort: number, port: number, error?: Error & { code?: string }): string {
  const what = `read tcp4 127.0.0.1:${localPort}->127.0.0.1:${port}: `;
  if (!error) return `${what}use of closed network connection`;
  if (error.code === 'ECONNRESET') return `${what}read: connection reset by peer`;
  return `${what}${error.message}`;
}

/** What `new Socket` takes, besides the documented options, to wrap a handle received over IPC. */
type HandleSocketOptions = SocketConstructorOpts & ConnectOpts & { handle: unknown };

/** The dialers and pod connections that close() ends. */
interface Resources {
  dialers: Set<ChildProcess>;
  sockets: Set<Socket>;
}

/** One port of one forward: its connection inside the pod's netns, and both directions of it. */
class ForwardedPort {
  readonly #ws: WebSocket;
  /** The WebSocket's own connection, which data frames are written to directly. */
  readonly #clientSocket: Duplex;
  readonly #target: PortForwardTarget;
  readonly #port: number;
  readonly #dataChannel: number;
  readonly #resources: Resources;
  readonly #onDone: () => void;
  readonly #dialer: ChildProcess;
  #socket: Socket | undefined;
  /** Client bytes that arrived while the connection was being made. */
  #queued: Buffer[] = [];
  /** Called once the pod's socket takes writes again. */
  #onWritable: (() => void) | undefined;
  #failure: string | undefined;
  #clientGone = false;
  #done = false;
  #dialerOutput = '';
  /** Frame buffers whose frames were written, ready for the next read. */
  readonly #freeBuffers: ArrayBuffer[] = [];
  /** Frame buffers handed to the socket or waiting in the WebSocket. */
  #buffersInFlight = 0;
  /** Whether reading stopped because every buffer was in flight. */
  #readingStopped = false;

  constructor(
    ws: WebSocket,
    clientSocket: Duplex,
    target: PortForwardTarget,
    index: number,
    resources: Resources,
    onDone: () => void,
  ) {
    this.#ws = ws;
    this.#clientSocket = clientSocket;
    this.#target = target;
    this.#port = target.ports[index] ?? 0;
    this.#dataChannel = index * 2;
    this.#resources = resources;
    this.#onDone = onDone;
    const portBytes = [this.#port & 0xff, this.#port >> 8];
    ws.send(Buffer.from([this.#dataChannel, ...portBytes]));
    ws.send(Buffer.from([this.#dataChannel + 1, ...portBytes]));

    this.#dialer = spawn(
      'nsenter',
      [
        `--net=/run/netns/${target.netns}`,
        '--',
        process.execPath,
        '-e',
        DIALER,
        String(this.#port),
      ],
      { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] },
    );
    resources.dialers.add(this.#dialer);
    this.#dialer.stderr!.on('data', (chunk: Buffer) => (this.#dialerOutput += chunk.toString()));
    this.#dialer.on('message', (answer: DialAnswer, handle?: unknown) =>
      this.#onDialed(answer, handle),
    );
    this.#dialer.on('error', () => undefined);
    this.#dialer.once('close', () => this.#onDialerGone());
  }

  /** Passes client bytes to the pod; false: wait for {@link onceWritable}. */
  write(data: Buffer): boolean {
    if (this.#done || this.#clientGone) return true;
    const socket = this.#socket;
    if (!socket) {
      this.#queued.push(data);
      return false;
    }
    // The pod closed the connection: what the client still sends goes nowhere, as with a kubelet.
    return socket.writable ? socket.write(data) : true;
  }

  onceWritable(callback: () => void): void {
    if (this.#done) callback();
    else this.#onWritable = callback;
  }

  /** The client went away: the pod sees EOF once what is in flight got through. */
  clientGone(): void {
    this.#clientGone = true;
    this.#queued = [];
    const socket = this.#socket;
    if (!socket) {
      this.#dialer.kill('SIGKILL');
      return;
    }
    if (socket.destroyed) return;
    socket.end();
    const timer = setTimeout(() => socket.destroy(), LINGER_MS).unref();
    socket.once('close', () => clearTimeout(timer));
  }

  #onDialed(answer: DialAnswer, handle: unknown): void {
    if ('error' in answer || !handle) {
      this.#fail(this.#dialFailure('error' in answer ? answer.error : 'no connection'));
      return;
    }
    const options: HandleSocketOptions = {
      handle,
      readable: true,
      writable: true,
      onread: { buffer: this.#nextReadBuffer, callback: this.#toClient },
    };
    const socket = new Socket(options);
    if (this.#clientGone || this.#done) {
      socket.destroy();
      this.#disconnectDialer();
      return;
    }
    const localPort = socket.localPort ?? 0;
    this.#socket = socket;
    this.#resources.sockets.add(socket);
    // As Go dials for the kubelet: what the client sends is not held back by Nagle.
    socket.setNoDelay(true);
    socket.on('drain', this.#writable);
    socket.on('error', (error) => (this.#failure ??= readFailure(localPort, this.#port, error)));
    socket.once('close', () => {
      this.#resources.sockets.delete(socket);
      this.#disconnectDialer();
      this.#finish(this.#failure);
    });
    const queued = this.#queued;
    this.#queued = [];
    let writable = true;
    for (const data of queued) writable = socket.write(data);
    if (writable) this.#writable();
  }

  /** The part of a free frame buffer after its header room, for the socket to read into. */
  readonly #nextReadBuffer = (): Uint8Array => {
    this.#buffersInFlight += 1;
    const frameBuffer = this.#freeBuffers.pop() ?? new ArrayBuffer(HEADER_ROOM + READ_BYTES);
    return new Uint8Array(frameBuffer, HEADER_ROOM);
  };

  /** Frames what was read; false pauses the pod's socket until frame buffers come back. */
  readonly #toClient = (length: number, readArea: Uint8Array): boolean => {
    const frameBuffer = readArea.buffer as ArrayBuffer;
    const ws = this.#ws;
    if (ws.readyState !== ws.OPEN) {
      this.#release(frameBuffer);
      return true;
    }
    const frame = frameInPlace(Buffer.from(frameBuffer), this.#dataChannel, length);
    this.#clientSocket.write(frame, () => this.#release(frameBuffer));
    this.#readingStopped = this.#buffersInFlight >= MAX_BUFFERS_IN_FLIGHT;
    return !this.#readingStopped;
  };

  #release(frameBuffer: ArrayBuffer): void {
    this.#buffersInFlight -= 1;
    this.#freeBuffers.push(frameBuffer);
    if (this.#readingStopped && this.#buffersInFlight <= MAX_BUFFERS_IN_FLIGHT / 2) {
      this.#readingStopped = false;
      this.#socket?.resume();
    }
  }

  readonly #writable = (): void => {
    const callback = this.#onWritable;
    this.#onWritable = undefined;
    callback?.();
  };

  #onDialerGone(): void {
    this.#resources.dialers.delete(this.#dialer);
    const socket = this.#socket;
    if (!socket) {
      const said = this.#dialerOutput.trim();
      this.#fail(this.#dialFailure(said || 'the dialer in the pod network namespace died'));
    } else if (!socket.destroyed) {
      // Like a kubelet that lost the connection under the copy.
      this.#failure ??= readFailure(socket.localPort ?? 0, this.#port);
      socket.destroy();
    }
  }

  #disconnectDialer(): void {
    if (this.#dialer.connected) this.#dialer.disconnect();
  }

  #dialFailure(reason: string): string {
    return `failed to connect to localhost:${this.#port} inside namespace "${this.#target.netns}": dial tcp4 127.0.0.1:${this.#port}: ${reason}`;
  }

  #fail(reason: string): void {
    this.#disconnectDialer();
    this.#finish(reason);
  }

  #finish(failure: string | undefined): void {
    if (this.#done) return;
    this.#done = true;
    const ws = this.#ws;
    if (failure && !this.#clientGone && ws.readyState === ws.OPEN) {
      const { podName, uid } = this.#target;
      const message = `error forwarding port ${this.#port} to pod ${podName}, uid ${uid}: ${failure}`;
      ws.send(Buffer.concat([Buffer.from([this.#dataChannel + 1]), Buffer.from(message)]));
    }
    this.#writable();
    this.#onDone();
  }
}

export class PortForwarder {
  readonly #server = new WebSocketServer({
    noServer: true,
    perMessageDeflate: false,
    handleProtocols: (protocols) =>
      protocols.has(PORT_FORWARD_PROTOCOL) ? PORT_FORWARD_PROTOCOL : false,
  });
  readonly #resources: Resources = { dialers: new Set(), sockets: new Set() };

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
    this.#server.handleUpgrade(req, socket, head, (ws) => this.#forward(ws, socket, target));
  }

  close(): void {
    for (const client of this.#server.clients) client.terminate();
    for (const socket of this.#resources.sockets) socket.destroy();
    for (const dialer of this.#resources.dialers) dialer.kill('SIGKILL');
    this.#server.close();
  }

  #forward(ws: WebSocket, socket: Duplex, target: PortForwardTarget): void {
    let open = target.ports.length;
    // Like the kubelet: the stream is closed once forwarding ended on every port.
    const portDone = (): void => {
      open -= 1;
      if (open === 0 && ws.readyState === ws.OPEN) ws.close(1000);
    };
    const ports = target.ports.map(
      (_, index) => new ForwardedPort(ws, socket, target, index, this.#resources, portDone),
    );
    const blocked = new Set<number>();

    ws.on('message', (data: Buffer) => {
      const channel = data[0];
      if (channel === undefined || channel % 2 !== 0 || data.length === 1) return;
      const port = ports[channel / 2];
      if (!port || port.write(data.subarray(1))) return;
      blocked.add(channel);
      ws.pause();
      port.onceWritable(() => {
        blocked.delete(channel);
        if (blocked.size === 0) ws.resume();
      });
    });
    ws.once('close', () => {
      for (const port of ports) port.clientGone();
    });
    ws.on('error', () => ws.terminate());
  }
}
