import { randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { chmodSync, mkdtempSync, readdirSync, realpathSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { layerPath } from '../package-root.js';
import { isAlive } from '../platform/local/netns.js';
import { FrameMemory } from '../protocol/frame-memory.js';
import { FrameDecoder, encodeFrame } from '../protocol/framing.js';
import {
  parseLayerMessage,
  sessionMessageToWire,
  type LayerMessage,
  type SessionMessage,
} from './layer-messages.js';

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
  /** A process of the app greeted the session: it uses it from now on. */
  join: [{ pid: number }];
  listen: [AppListener];
  /** The app stopped listening on `port` (closed it, or the process is gone). */
  close: [{ pid: number; port: number }];
  /**
   * A process asked for the client of the replayed connection from `sourcePort` to the app's
   * `localPort` before it was announced (or while an earlier connection's entry stood): it waits
   * for announcePeer, for up to two seconds.
   */
  waiting: [{ sourcePort: number; localPort: number }];
  /**
   * A process of the app calls on one of the target's paths (src/features/files/layer.ts):
   * answer with `reply` on that process's connection.
   */
  file: [request: Extract<LayerMessage, { type: 'file' }>, reply: LayerReply];
  /** A process of the app connects through the target (src/features/outgoing/layer.ts). */
  connect: [request: Extract<LayerMessage, { type: 'connect' }>, reply: LayerReply];
  /** A process of the app looks a name up (src/features/outgoing/layer.ts). */
  resolve: [request: Extract<LayerMessage, { type: 'resolve' }>, reply: LayerReply];
}

/** Answers one process of the app; `send` resolves once the socket can take more. */
export interface LayerReply {
  /** Sends the messages in one frame; resolves once the socket takes more. */
  send(...messages: SessionMessage[]): Promise<void>;
}

/** Frames longer than this are not the layer's: the connection is dropped. */
const MAX_FRAME_BYTES = 4096;

/**
 * How long a lookup waits for its connection to be announced (the layer itself waits 1 s): the
 * app may accept a replayed connection before the replay has seen its own connect complete.
 */
const LOOKUP_WAIT_MS = 2000;
/** Lookups one process may have waiting at once (the layer has 64 slots a process). */
const MAX_LOOKUPS = 256;

interface Peer {
  address: string;
  port: number;
  /** The app's socket (its inode) that a lookup named for this connection, once one did. */
  socket?: string;
}

interface Lookup {
  connection: LayerConnection;
  socket: string;
  timer: NodeJS.Timeout;
}

interface LayerConnection {
  socket: net.Socket;
  /** It showed the token: until then its lines are ignored and it is told nothing. */
  greeted: boolean;
  /** Ports this process announced and has not closed. */
  ports: Map<number, AppListener>;
  /** Its lookups waiting for their connection to be announced. */
  lookups: number;
  /** Local ports it was told others accept on too (it asks for their peers): told once. */
  shared: Set<number>;
  /**
   * Where its replies are encoded: a file's MiB pieces in fresh buffers cost the CLI more in
   * garbage collection than in copying (see FrameMemory).
   */
  replies: FrameMemory;
}

/**
 * The channel's directory: `mirrord-layer-PID-XXXXXX` in the temporary directory, PID the CLI's,
 * so that what a killed CLI left (its socket, the layer's stand-ins of the target's
 * directories) is told from a live session's and removed when the next one opens.
 */
const DIR_PREFIX = 'mirrord-layer-';
const DIR_OWNER = new RegExp(`^${DIR_PREFIX}(\\d+)-`);

function removeStaleDirs(parent: string): void {
  for (const name of readdirSync(parent)) {
    const owner = DIR_OWNER.exec(name)?.[1];
    if (owner !== undefined && !isAlive(Number(owner))) {
      rmSync(join(parent, name), { recursive: true, force: true });
    }
  }
}

/** A replayed connection's key: the replay's source port and the app's port it reached. */
const keyOf = (sourcePort: number, localPort: number): string => `${sourcePort}/${localPort}`;

/**
 * The CLI's end of the layer's unix socket (see layer/layer.c): each process of the local app
 * connects on its own and reports, in msgpack messages (layer-messages.ts), the ports it starts
 * and stops listening on; the CLI answers on the same connection with the original peer of each replayed
 * connection, which the app's accept() then reports.
 *
 * A replayed connection is known by its source port and the app's port it reached: the kernel
 * gives one source port to connections to different ports at once. The peer reaches the app two
 * ways (see layer/layer.c): pushed to every process that listens on that port, for the process
 * that listened and accepts alone; and asked for, with the app's socket, by any other process:
 * pre-fork workers that inherited the listener, a process handed an accepted socket. A process
 * that asks tells the session that the port's connections are accepted elsewhere than where they
 * were pushed: the processes they were pushed to are told to ask too, so an entry pushed to one
 * and accepted by another is never taken for a later connection. A source port is reused once
 * its connection is gone, so an entry answers only the first socket that asks for it: another
 * socket asking is a later connection from the same source port, and waits for that one's
 * announcement.
 *
 * An app may drop privileges (a server started as root that becomes `nobody` to bind port 80),
 * so the socket is open to every user, in a directory they may enter but not list. What keeps
 * other users out is the token in the app's environment (MIRRORD_LAYER_TOKEN, readable only by
 * the app's own user): a connection's first message must carry it, or it is dropped unheard.
 */
export class LayerChannel extends EventEmitter<LayerChannelEvents> {
  readonly #server = net.createServer();
  readonly #connections = new Set<LayerConnection>();
  /**
   * Replayed connections by key, from their announcement until they are closed (forgetPeer):
   * the app may ask as long as it holds the socket (a worker reads its peer whenever it likes).
   */
  readonly #peers = new Map<string, Peer>();
  /** Lookups that came before their connection's announcement, by key. */
  readonly #lookups = new Map<string, Lookup[]>();
  readonly #dir: string;
  readonly path: string;
  /** Give it to the app as MIRRORD_LAYER_TOKEN. */
  readonly token = randomBytes(16).toString('hex');

  private constructor() {
    super();
    // Without symlinks on the way: the layer tells its stand-ins by the paths the kernel gives
    // for their descriptors (layer/files.c), which are resolved.
    const parent = realpathSync(tmpdir());
    removeStaleDirs(parent);
    this.#dir = mkdtempSync(join(parent, `${DIR_PREFIX}${process.pid}-`));
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

  /**
   * The variables a process of the app starts with to use this channel: the layer preloaded
   * (before what the CLI's environment preloads), the socket and its token.
   */
  variables(): Record<string, string> {
    return {
      LD_PRELOAD: [layerPath(), process.env.LD_PRELOAD].filter(Boolean).join(':'),
      MIRRORD_LAYER_SOCKET: this.path,
      MIRRORD_LAYER_TOKEN: this.token,
    };
  }

  /** Everything the app listens on now. */
  listening(): AppListener[] {
    return [...this.#connections].flatMap((c) => [...c.ports.values()]);
  }

  /**
   * Tells the app who the original client of the replayed connection from `sourcePort` to the
   * app's `localPort` (an AppListener's) is. Call it right after connecting (Replay's
   * onConnected): the layer waits for it only briefly. Every process listening on the port is
   * told at once (the layer keeps a small table that forgets old entries); any other asks for it,
   * and is answered as soon as it is known.
   */
  announcePeer(
    sourcePort: number,
    localPort: number,
    original: { address: string; port: number },
  ): void {
    const key = keyOf(sourcePort, localPort);
    const entry: Peer = { address: original.address, port: original.port };
    this.#peers.set(key, entry);
    const frame = frameOf({
      type: 'peer',
      sourcePort,
      localPort,
      address: original.address,
      port: original.port,
      socket: null,
    });
    // Also to those told to ask: one may accept before it has read that it should.
    for (const connection of this.#holders(localPort)) connection.socket.write(frame);
    const waiting = this.#lookups.get(key);
    const first = waiting?.shift();
    if (!first) return;
    if (waiting!.length === 0) this.#lookups.delete(key);
    clearTimeout(first.timer);
    first.connection.lookups -= 1;
    this.#answer(first.connection, sourcePort, localPort, first.socket, entry);
  }

  /**
   * The replayed connection from `sourcePort` to `localPort` is closed on both sides (Replay's
   * onClosed): nothing asks about it any more, and a later connection from the same source port
   * must not be answered with its client.
   */
  forgetPeer(sourcePort: number, localPort: number): void {
    this.#peers.delete(keyOf(sourcePort, localPort));
  }

  async close(): Promise<void> {
    for (const connection of this.#connections) connection.socket.destroy();
    for (const lookups of this.#lookups.values())
      for (const { timer } of lookups) clearTimeout(timer);
    this.#lookups.clear();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    rmSync(this.#dir, { recursive: true, force: true });
  }

  #accept(socket: net.Socket): void {
    const connection: LayerConnection = {
      socket,
      greeted: false,
      ports: new Map(),
      lookups: 0,
      shared: new Set(),
      replies: new FrameMemory(),
    };
    this.#connections.add(connection);
    const decoder = new FrameDecoder(parseLayerMessage, { maxFrameSize: MAX_FRAME_BYTES });
    socket.on('data', (chunk: Buffer) => {
      let messages: LayerMessage[];
      try {
        messages = decoder.push(chunk);
      } catch {
        // Not the layer: whatever it is gets nothing more.
        socket.destroy();
        return;
      }
      for (const message of messages) this.#onMessage(connection, message);
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

  #onMessage(connection: LayerConnection, message: LayerMessage): void {
    if (connection.socket.destroyed) return;
    if (!connection.greeted) {
      const token = Buffer.from(message.type === 'hello' ? message.token : '');
      const expected = Buffer.from(this.token);
      if (token.length !== expected.length || !timingSafeEqual(token, expected)) {
        connection.socket.destroy();
        return;
      }
      connection.greeted = true;
      if (message.type === 'hello') this.emit('join', { pid: message.pid });
      return;
    }
    switch (message.type) {
      case 'lookup':
        this.#lookup(connection, message.sourcePort, message.localPort, message.socket);
        return;
      case 'listen': {
        const { type, ...listener } = message;
        connection.ports.set(listener.port, listener);
        const holders = this.#holders(listener.localPort);
        if (holders.length > 1) this.#share(holders, listener.localPort);
        this.emit('listen', listener);
        return;
      }
      case 'close':
        if (connection.ports.delete(message.port)) {
          this.emit('close', { pid: message.pid, port: message.port });
        }
        return;
      case 'file':
        this.emit('file', message, replyTo(connection));
        return;
      case 'connect':
        this.emit('connect', message, replyTo(connection));
        return;
      case 'resolve':
        this.emit('resolve', message, replyTo(connection));
        return;
      case 'hello':
        return; // once is enough
    }
  }

  /** The processes that said they listen on the app's `localPort`. */
  #holders(localPort: number): LayerConnection[] {
    return [...this.#connections].filter(
      (c) =>
        c.greeted && [...c.ports.values()].some((listener) => listener.localPort === localPort),
    );
  }

  /**
   * Connections to `localPort` are accepted by more than one process (Node cluster workers
   * handed one listener, SO_REUSEPORT listeners, a pre-fork worker that asked): a process the
   * peers were pushed to may hold a copy another process accepted, and take it for a later
   * connection from the same source port. Each is told to ask instead, once.
   */
  #share(holders: LayerConnection[], localPort: number): void {
    const frame = frameOf({ type: 'shared', localPort });
    for (const holder of holders) {
      if (holder.shared.has(localPort)) continue;
      holder.shared.add(localPort);
      holder.socket.write(frame);
    }
  }

  /** A process asks who the original client of the app's `socket` (from `sourcePort`) is. */
  #lookup(
    connection: LayerConnection,
    sourcePort: number,
    localPort: number,
    socket: string,
  ): void {
    this.#share(this.#holders(localPort), localPort);
    const key = keyOf(sourcePort, localPort);
    const entry = this.#peers.get(key);
    if (entry && (entry.socket === undefined || entry.socket === socket)) {
      this.#answer(connection, sourcePort, localPort, socket, entry);
      return;
    }
    // Not announced yet, or the entry is an earlier connection's: wait for the announcement.
    if (connection.lookups >= MAX_LOOKUPS) return;
    connection.lookups += 1;
    const lookup: Lookup = {
      connection,
      socket,
      timer: setTimeout(() => {
        const waiting = this.#lookups.get(key) ?? [];
        const left = waiting.filter((other) => other !== lookup);
        if (left.length) this.#lookups.set(key, left);
        else this.#lookups.delete(key);
        connection.lookups -= 1;
      }, LOOKUP_WAIT_MS),
    };
    this.#lookups.set(key, [...(this.#lookups.get(key) ?? []), lookup]);
    this.emit('waiting', { sourcePort, localPort });
  }

  #answer(
    connection: LayerConnection,
    sourcePort: number,
    localPort: number,
    socket: string,
    entry: Peer,
  ): void {
    entry.socket = socket;
    if (connection.socket.destroyed) return;
    connection.socket.write(
      frameOf({
        type: 'peer',
        sourcePort,
        localPort,
        address: entry.address,
        port: entry.port,
        socket,
      }),
    );
  }
}

/** Answers on one process's connection. */
function replyTo(connection: LayerConnection): LayerReply {
  return {
    send: (...replies) =>
      new Promise<void>((resolve) => {
        const socket = connection.socket;
        if (socket.destroyed) {
          resolve();
          return;
        }
        const frame = encodeFrame(replies.map(sessionMessageToWire), connection.replies);
        const written = (): void => connection.replies.written(frame);
        if (socket.write(frame, written)) {
          resolve();
          return;
        }
        const done = (): void => {
          socket.off('drain', done).off('close', done);
          resolve();
        };
        socket.on('drain', done).on('close', done);
      }),
  };
}

/** A frame of one message: each goes out as soon as it is known. */
function frameOf(message: SessionMessage): Buffer {
  return encodeFrame([sessionMessageToWire(message)]);
}
