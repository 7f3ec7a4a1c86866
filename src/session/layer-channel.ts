import { randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A listening socket of the local app, as the layer reported it. */
export interface AppListener {
  pid: number;
  /** The port the app asked for: the remote port it stands for. */
  port: number;
  /** The port it really listens on (differs when the asked-for one was taken or privileged). */
  localPort: number;
  family: 4 | 6;
  address: string;
}

export interface LayerChannelEvents {
  listen: [AppListener];
  /** The app stopped listening on `port` (closed it, or the process is gone). */
  close: [{ pid: number; port: number }];
}

/** Lines longer than this are not the layer's: the connection is dropped. */
const MAX_LINE = 4096;

interface LayerConnection {
  socket: net.Socket;
  /** It showed the token: until then its lines are ignored and it is told nothing. */
  greeted: boolean;
  /** Ports this process announced and has not closed. */
  ports: Map<number, AppListener>;
}

/**
 * The CLI's end of the layer's unix socket (see layer/layer.c): each process of the local app
 * connects on its own and reports, one JSON line each, the ports it starts and stops listening
 * on; the CLI answers on the same connection with the original peer of each replayed
 * connection, which the app's accept() then reports.
 *
 * An app may drop privileges (a server started as root that becomes `nobody` to bind port 80),
 * so the socket is open to every user, in a directory they may enter but not list. What keeps
 * other users out is the token in the app's environment (MIRRORD_LAYER_TOKEN, readable only by
 * the app's own user): a connection's first line must carry it, or it is dropped unheard.
 */
export class LayerChannel extends EventEmitter<LayerChannelEvents> {
  readonly #server = net.createServer();
  readonly #connections = new Set<LayerConnection>();
  readonly #dir: string;
  readonly path: string;
  /** Give it to the app as MIRRORD_LAYER_TOKEN. */
  readonly token = randomBytes(16).toString('hex');

  private constructor() {
    super();
    this.#dir = mkdtempSync(join(tmpdir(), 'mirrord-layer-'));
    this.path = join(this.#dir, 'layer.sock');
    this.#server.on('connection', (socket) => this.#accept(socket));
  }

  static async open(): Promise<LayerChannel> {
    const channel = new LayerChannel();
    await new Promise<void>((resolve, reject) => {
      channel.#server.once('error', reject);
      channel.#server.listen(channel.path, resolve);
    });
    chmodSync(channel.#dir, 0o711);
    chmodSync(channel.path, 0o666);
    return channel;
  }

  /** Everything the app listens on now. */
  listening(): AppListener[] {
    return [...this.#connections].flatMap((c) => [...c.ports.values()]);
  }

  /**
   * Tells the app who the original client of the replayed connection from local port
   * `sourcePort` is. Call it right after connecting (Replay's onConnected): the layer waits for
   * it only briefly. Every listening process is told, since only the one that accepts the
   * connection looks the port up; the layer keeps a small table that forgets old entries.
   */
  announcePeer(sourcePort: number, original: { address: string; port: number }): void {
    const peer = { local_port: sourcePort, address: original.address, port: original.port };
    const line = `${JSON.stringify({ peer })}\n`;
    for (const connection of this.#connections) {
      if (connection.greeted && connection.ports.size > 0) connection.socket.write(line);
    }
  }

  async close(): Promise<void> {
    for (const connection of this.#connections) connection.socket.destroy();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    rmSync(this.#dir, { recursive: true, force: true });
  }

  #accept(socket: net.Socket): void {
    const connection: LayerConnection = { socket, greeted: false, ports: new Map() };
    this.#connections.add(connection);
    let pending = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      pending += chunk;
      let newline: number;
      while ((newline = pending.indexOf('\n')) >= 0) {
        this.#onLine(connection, pending.slice(0, newline));
        pending = pending.slice(newline + 1);
      }
      if (pending.length > MAX_LINE) socket.destroy();
    });
    socket.on('error', () => socket.destroy());
    // A process that exits cannot say close: its connection ending says it for every port.
    socket.on('close', () => {
      this.#connections.delete(connection);
      for (const listener of connection.ports.values()) {
        this.emit('close', { pid: listener.pid, port: listener.port });
      }
      connection.ports.clear();
    });
  }

  #onLine(connection: LayerConnection, line: string): void {
    let event: Record<string, unknown>;
    try {
      event = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return;
    }
    if (!connection.greeted) {
      const token = Buffer.from(typeof event.token === 'string' ? event.token : '');
      const expected = Buffer.from(this.token);
      if (
        event.event !== 'hello' ||
        token.length !== expected.length ||
        !timingSafeEqual(token, expected)
      ) {
        connection.socket.destroy();
        return;
      }
      connection.greeted = true;
      return;
    }
    const { pid, port } = event;
    if (typeof pid !== 'number' || typeof port !== 'number') return;
    if (event.event === 'listen') {
      const listener: AppListener = {
        pid,
        port,
        localPort: typeof event.local_port === 'number' ? event.local_port : port,
        family: event.family === 6 ? 6 : 4,
        address: typeof event.address === 'string' ? event.address : '127.0.0.1',
      };
      connection.ports.set(port, listener);
      this.emit('listen', listener);
    } else if (event.event === 'close' && connection.ports.delete(port)) {
      this.emit('close', { pid, port });
    }
  }
}
