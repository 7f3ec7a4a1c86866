/**
 * The agent's end of a session: the handshake, the client's requests as events (each answered
 * with ackSubscribe, failSubscribe or ackUnsubscribe; a feature's with reply or failRequest),
 * and the agent's messages batched into frames. It knows nothing about the tap or reassembly:
 * mirroring's agent side (src/features/mirror/agent.ts) glues those to it, sends each tap
 * batch's messages and flushes them, and stops reading the tap while the client is behind
 * (`backlogBytes`) until 'drain'.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { monotonicMicros } from './clock.js';
import { FrameDecoder, FrameWriter, type FrameLimits } from './framing.js';
import {
  CAPABILITIES,
  PROTOCOL_VERSION,
  ProtocolError,
  agentMessageToWire,
  parseClientMessage,
  type AgentMessage,
  type ClientHelloMessage,
  type ClientMessage,
  type CloseReason,
  type Counters,
  type OpenedMessage,
  type StreamMessage,
  type WireValue,
} from './messages.js';

/**
 * Frames the agent aims at: a socket read's size (Node reads 64 KiB at a time), less the frame
 * header, so that the CLI decodes most frames in place in the chunk that carries them and copies
 * the others once. With frames of up to a MiB it copied most bytes twice, through freshly
 * allocated buffers: its reader took twice the CPU for a 1 Gbit/s stream (README, Benchmarks).
 */
const FRAME_BYTES = 64 * 1024 - 4;
/** Larger payloads are sent as several `data` messages, each with its header in one frame. */
const MAX_DATA_MESSAGE_BYTES = FRAME_BYTES - 64;
/** Bytes waiting in the session's socket past which streams pause (see streamsBehind). */
const STREAMS_BEHIND_BYTES = 512 * 1024;
/** Agent error messages are for humans; a runaway one must not fill a frame. */
const MAX_ERROR_TEXT = 4096;

export type AgentSessionErrorCode =
  | 'refused'
  /** The client's hello did not carry the agent's session secret. */
  | 'unauthorized'
  | 'handshake-timeout'
  /** Nothing from the client for `idleTimeoutMs`: the CLI or the path to it is gone. */
  | 'idle-timeout'
  /** More than `maxBacklogBytes` waited to be written: the agent ignored needsDrain. */
  | 'backlog'
  /** The client left without `bye`, or the stream failed. */
  | 'closed';

export class AgentSessionError extends Error {
  override name = 'AgentSessionError';
  constructor(
    readonly code: AgentSessionErrorCode,
    message: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

export interface AgentSessionOptions extends FrameLimits {
  /** Free text for the CLI, e.g. "mirrord-agent 0.1.0 on node-3". */
  agent: string;
  /** The target as resolved, e.g. "pid 4242". */
  target: string;
  /** Interfaces the tap is attached to. */
  interfaces: readonly string[];
  /** What a client's hello must carry to be admitted (see ClientHelloMessage.secret). */
  secret: string;
  capabilities?: readonly string[];
  /** How long the client has to send its hello (default 10 s). */
  handshakeTimeoutMs?: number;
  /** The session ends when nothing arrived from the client for this long (default 30 s). */
  idleTimeoutMs?: number;
  /** Longest a queued message waits before being written anyway (default 2 ms). */
  flushIntervalMs?: number;
  /** Queued bytes that trigger a write (default 256 KiB). */
  flushBytes?: number;
  /** Bytes waiting in the stream beyond which the session is ended (default 64 MiB). */
  maxBacklogBytes?: number;
}

/** Event name → listener arguments. */
export interface AgentSessionEvents {
  /** Answer with ackSubscribe(port) once the tap copies the port, or failSubscribe(). */
  subscribe: [port: number];
  /** Answer with ackUnsubscribe(port). */
  unsubscribe: [port: number];
  /** Already answered with a pong; for liveness bookkeeping only. */
  ping: [nonce: number];
  /** A feature's request (see src/features/): answer with reply() or failRequest(). */
  request: [id: number, feature: string, body: WireValue];
  /** A message of one of the streams a feature opened (see src/protocol/streams.ts). */
  stream: [StreamMessage];
  /** The stream's buffer emptied after needsDrain: resume reading the tap. */
  drain: [];
  /**
   * The session is over; emitted exactly once. `error` is undefined when the client said bye or
   * the agent called close(), otherwise a ProtocolError or an AgentSessionError. The session
   * never emits 'error', so a hostile client cannot crash an agent that forgot a listener.
   */
  end: [error: Error | undefined];
}

type Phase = 'handshake' | 'open' | 'ended';

export class AgentSession extends EventEmitter<AgentSessionEvents> {
  readonly #stream: Duplex;
  readonly #options: AgentSessionOptions;
  readonly #decoder: FrameDecoder<ClientMessage>;
  readonly #writer: FrameWriter<AgentMessage>;
  readonly #maxBacklogBytes: number;
  #phase: Phase = 'handshake';
  #client: ClientHelloMessage | undefined;
  #handshake!: { resolve: () => void; reject: (error: Error) => void };
  #watchdog: NodeJS.Timeout;
  #queue: ClientMessage[] = [];

  private constructor(stream: Duplex, options: AgentSessionOptions) {
    super();
    this.#stream = stream;
    this.#options = options;
    this.#decoder = new FrameDecoder(parseClientMessage, options);
    this.#writer = new FrameWriter(stream, agentMessageToWire, {
      frameBytes: FRAME_BYTES,
      reuseMemory: true,
      ...options,
      flushIntervalMs: options.flushIntervalMs ?? 2,
    });
    this.#maxBacklogBytes = options.maxBacklogBytes ?? 64 * 1024 * 1024;
    this.#watchdog = setTimeout(
      () =>
        this.#abort(
          new AgentSessionError('handshake-timeout', 'the client did not send its hello in time'),
        ),
      options.handshakeTimeoutMs ?? 10_000,
    );
    if (stream instanceof net.Socket) stream.setNoDelay(true);
  }

  /** Runs the handshake on an accepted stream; rejects (and closes it) if that fails. */
  static async accept(stream: Duplex, options: AgentSessionOptions): Promise<AgentSession> {
    const session = new AgentSession(stream, options);
    await new Promise<void>((resolve, reject) => {
      session.#handshake = { resolve, reject };
      stream.on('data', (chunk: Buffer) => session.#onChunk(chunk));
      stream.on('end', () => session.#onStreamGone());
      stream.on('close', () => session.#onStreamGone());
      stream.on('drain', session.#onDrain);
      stream.on('error', (error) =>
        session.#finish(
          new AgentSessionError('closed', `connection to the client failed: ${error.message}`, {
            cause: error,
          }),
        ),
      );
    });
    return session;
  }

  /** The client's hello. */
  get client(): ClientHelloMessage {
    return this.#client as ClientHelloMessage; // set before accept() resolves
  }

  /** The CLI is not keeping up: stop reading the tap until 'drain'. */
  get needsDrain(): boolean {
    return this.#stream.writableNeedDrain;
  }

  /** Bytes written to the stream and not yet taken by the client. */
  get backlogBytes(): number {
    return this.#stream.writableLength;
  }

  get ended(): boolean {
    return this.#phase === 'ended';
  }

  ackSubscribe(port: number): void {
    this.#sendNow({ type: 'subscribed', port });
  }

  failSubscribe(port: number, reason: string): void {
    this.#sendNow({ type: 'subscribeFailed', port, reason: reason.slice(0, MAX_ERROR_TEXT) });
  }

  ackUnsubscribe(port: number): void {
    this.#sendNow({ type: 'unsubscribed', port });
  }

  sendOpened(connection: Omit<OpenedMessage, 'type'>): void {
    this.#send({ type: 'opened', ...connection });
  }

  /**
   * `bytes` is referenced, not copied, until the next flush() copies it into a frame: call
   * flush() before its memory is reused (e.g. before handing a ring-buffer batch back).
   */
  sendData(id: number, bytes: Buffer, tapMicros: number): void {
    for (let offset = 0; offset < bytes.length; offset += MAX_DATA_MESSAGE_BYTES) {
      const end = Math.min(bytes.length, offset + MAX_DATA_MESSAGE_BYTES);
      this.#send({
        type: 'data',
        id,
        bytes: offset === 0 && end === bytes.length ? bytes : bytes.subarray(offset, end),
        tapMicros,
      });
    }
  }

  sendClosed(id: number, reason: CloseReason, gapBytes = 0): void {
    this.#send({ type: 'closed', id, reason, gapBytes });
  }

  sendCounters(counters: Counters): void {
    this.#send({ type: 'counters', ...counters });
  }

  reply(id: number, body: WireValue): void {
    this.#sendNow({ type: 'reply', id, error: null, body });
  }

  failRequest(id: number, error: string): void {
    this.#sendNow({ type: 'reply', id, error: error.slice(0, MAX_ERROR_TEXT), body: null });
  }

  /**
   * A stream's message goes out at once: streams carry request-and-answer protocols (a
   * database's), whose every small message the batching interval would delay.
   */
  sendStream(message: StreamMessage): void {
    this.#sendNow(message);
  }

  /**
   * Streams stop reading their sockets before the tap would (see REPLY_BELOW_BYTES in
   * src/features/host.ts): bulk outgoing data must not make mirroring drop.
   */
  get streamsBehind(): boolean {
    return this.#stream.writableLength >= STREAMS_BEHIND_BYTES;
  }

  onceDrained(listener: () => void): void {
    this.#stream.once('drain', listener);
  }

  /** A non-fatal problem; for a fatal one use close({ code, message }). */
  sendWarning(code: string, message: string): void {
    this.#sendNow({ type: 'error', code, message: message.slice(0, MAX_ERROR_TEXT), fatal: false });
  }

  /**
   * Writes what is queued as one frame. Returns false when the stream's buffer is full: stop
   * reading the tap until 'drain'. Call it after each tap batch; queued messages are also
   * written by themselves after `flushIntervalMs` or once `flushBytes` are queued.
   */
  flush(): boolean {
    if (this.#phase === 'ended') return false;
    const ok = this.#writer.flush();
    return this.#withinBacklog() && ok;
  }

  /**
   * Ends the session: with `error`, the client is told why (a fatal error message) first.
   * Emits 'end' with no error.
   */
  close(error?: { code: string; message: string }): void {
    if (this.#phase === 'ended') return;
    this.#end(error);
    this.#finish(undefined);
  }

  #send(message: AgentMessage): void {
    if (this.#phase === 'ended') return;
    this.#writer.send(message);
    // The writer also flushes by itself (size, timer), so the bound is checked on every send.
    this.#withinBacklog();
  }

  #withinBacklog(): boolean {
    if (this.#stream.writableLength <= this.#maxBacklogBytes) return true;
    this.#abort(
      new AgentSessionError(
        'backlog',
        `more than ${this.#maxBacklogBytes} bytes wait to be sent to the client`,
      ),
    );
    return false;
  }

  #sendNow(message: AgentMessage): void {
    this.#send(message);
    this.flush();
  }

  /** Tells the client why (if there is a why), writes what is queued, and ends the stream. */
  #end(error: { code: string; message: string } | undefined): void {
    if (error) {
      // Not #send: its backlog check would end the session again, from inside this call.
      this.#writer.send({
        type: 'error',
        code: error.code,
        message: error.message.slice(0, MAX_ERROR_TEXT),
        fatal: true,
      });
    }
    this.#writer.flush();
    if (!this.#stream.destroyed) this.#stream.end();
    // A client that does not read would keep the stream open forever.
    setTimeout(() => this.#stream.destroy(), 1_000).unref();
  }

  /** Ends the session because of `error`, telling the client. */
  #abort(error: ProtocolError | AgentSessionError): void {
    if (this.#phase === 'ended') return;
    this.#end({
      code: error instanceof ProtocolError ? 'protocol' : error.code,
      message: error.message,
    });
    this.#finish(error);
  }

  #onChunk(chunk: Buffer): void {
    if (this.#phase === 'ended') return;
    this.#watchdog.refresh();
    let messages: ClientMessage[];
    try {
      messages = this.#decoder.push(chunk);
    } catch (error) {
      this.#abort(error as ProtocolError);
      return;
    }
    if (this.#phase === 'handshake') {
      const first = messages.shift();
      if (first === undefined) return;
      if (!this.#handshakeWith(first)) return;
      // Requests pipelined with the hello wait until the caller of accept() has listeners.
      this.#queue = messages;
      setImmediate(() => {
        const queued = this.#queue;
        this.#queue = [];
        this.#dispatchAll(queued);
      });
      return;
    }
    if (this.#queue.length > 0) {
      for (const message of messages) this.#queue.push(message);
      return;
    }
    this.#dispatchAll(messages);
  }

  #handshakeWith(hello: ClientMessage): boolean {
    if (hello.type !== 'hello') {
      this.#abort(new ProtocolError(`expected the client's hello, got ${hello.type}`));
      return false;
    }
    if (hello.version !== PROTOCOL_VERSION) {
      const reason = `the client speaks protocol v${hello.version}, this agent v${PROTOCOL_VERSION}`;
      this.#send({ type: 'refused', version: PROTOCOL_VERSION, reason });
      this.#end(undefined);
      this.#finish(new AgentSessionError('refused', reason));
      return false;
    }
    if (!sameSecret(hello.secret, this.#options.secret)) {
      const reason =
        'wrong session secret: only the mirrord that started this agent may join its session';
      this.#send({ type: 'refused', version: PROTOCOL_VERSION, reason });
      this.#end(undefined);
      this.#finish(new AgentSessionError('unauthorized', reason));
      return false;
    }
    this.#client = hello;
    this.#phase = 'open';
    this.#sendNow({
      type: 'hello',
      version: PROTOCOL_VERSION,
      capabilities: [...(this.#options.capabilities ?? CAPABILITIES)],
      agent: this.#options.agent,
      target: this.#options.target,
      interfaces: [...this.#options.interfaces],
      clockMicros: monotonicMicros(),
    });
    clearTimeout(this.#watchdog);
    const idleMs = this.#options.idleTimeoutMs ?? 30_000;
    this.#watchdog = setTimeout(
      () =>
        this.#abort(
          new AgentSessionError(
            'idle-timeout',
            `nothing received from the client for ${idleMs} ms`,
          ),
        ),
      idleMs,
    );
    this.#handshake.resolve();
    return true;
  }

  #dispatchAll(messages: ClientMessage[]): void {
    for (const message of messages) {
      if (this.#phase !== 'open') return;
      switch (message.type) {
        case 'subscribe':
          this.emit('subscribe', message.port);
          break;
        case 'unsubscribe':
          this.emit('unsubscribe', message.port);
          break;
        case 'ping':
          // While the stream is backed up the client is not reading anyway, and skipping the
          // pong keeps a ping flood from growing the backlog.
          if (!this.#stream.writableNeedDrain)
            this.#sendNow({ type: 'pong', nonce: message.nonce, clockMicros: monotonicMicros() });
          this.emit('ping', message.nonce);
          break;
        case 'request':
          this.emit('request', message.id, message.feature, message.body);
          break;
        case 'bye':
          this.close();
          break;
        case 'hello':
          this.#abort(new ProtocolError('hello sent twice'));
          break;
        default:
          this.emit('stream', message);
      }
    }
  }

  #onStreamGone(): void {
    this.#finish(new AgentSessionError('closed', 'the client left without saying bye'));
  }

  #finish(error: Error | undefined): void {
    if (this.#phase === 'ended') return;
    const wasOpen = this.#phase === 'open';
    this.#phase = 'ended';
    clearTimeout(this.#watchdog);
    this.#writer.close();
    this.#queue = [];
    this.#stream.off('drain', this.#onDrain);
    if (wasOpen) this.emit('end', error);
    else this.#handshake.reject(error ?? new AgentSessionError('closed', 'session closed'));
  }

  readonly #onDrain = (): void => {
    if (this.#phase === 'open') this.emit('drain');
  };
}

/**
 * Compares secrets in constant time: digests first, so that neither their contents nor their
 * lengths show in how long the comparison takes.
 */
function sameSecret(given: string, expected: string): boolean {
  const digest = (text: string) => createHash('sha256').update(text).digest();
  return timingSafeEqual(digest(given), digest(expected));
}
