/**
 * The CLI's end of a session with an agent: the handshake, keep-alive pings, subscribe,
 * unsubscribe and features' requests as promises, and the agent's messages as events. The CLI's session
 * (src/session/mirror.ts) starts one over the agent's stream with {@link AgentClient.start} and
 * hands it to a Replay, which listens to 'opened', 'data' and 'closed'. The agent stream is
 * never paused: the Replay keeps a slow local app's cost to that app's own connections.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import {
  AgentClock,
  STARTUP_CLOCK_SAMPLES,
  STARTUP_CLOCK_SAMPLE_INTERVAL_MS,
  monotonicMicros,
} from './clock.js';
import { FrameDecoder, FrameWriter, type FrameLimits } from './framing.js';
import {
  CAPABILITIES,
  PROTOCOL_VERSION,
  ProtocolError,
  clientMessageToWire,
  parseAgentMessage,
  type AgentHelloMessage,
  type AgentMessage,
  type ClientMessage,
  type ClosedMessage,
  type CountersMessage,
  type DataMessage,
  type ErrorMessage,
  type OpenedMessage,
  type StreamMessage,
  type WireValue,
} from './messages.js';

export type AgentClientErrorCode =
  /** The agent does not speak our protocol version. */
  | 'refused'
  | 'handshake-timeout'
  /** No byte from the agent for `deadAfterMs` while we were reading. */
  | 'dead-agent'
  /** The agent reported a fatal error: its code and text are in `agent`. */
  | 'agent'
  /** The connection ended without the agent saying why, or failed. */
  | 'closed'
  /** A subscribe/unsubscribe or a feature's request got no answer within `requestTimeoutMs`. */
  | 'request-timeout'
  | 'subscribe-failed'
  /** The agent answered a feature's request with an error (its text is the message). */
  | 'request-failed';

export class AgentClientError extends Error {
  override name = 'AgentClientError';
  constructor(
    readonly code: AgentClientErrorCode,
    message: string,
    /** What the agent said, for an `agent` error. */
    readonly agent?: { code: string; message: string },
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

export interface AgentClientOptions extends FrameLimits {
  /** Shown in the agent's logs. */
  clientName?: string;
  /** The agent's session secret (see PlacedAgent.secret); the agent refuses a hello without it. */
  secret: string;
  capabilities?: readonly string[];
  /** How long the agent has to answer the hello (default 10 s). */
  handshakeTimeoutMs?: number;
  /** Interval of keep-alive pings (default 5 s). */
  keepAliveIntervalMs?: number;
  /** The agent is declared dead when nothing at all came from it for this long (default 20 s). */
  deadAfterMs?: number;
  /** How long subscribe()/unsubscribe()/request() wait for the agent's answer (default 10 s). */
  requestTimeoutMs?: number;
}

export interface ConnectOptions extends AgentClientOptions {
  /** How long the TCP connection may take (default 10 s). */
  connectTimeoutMs?: number;
}

/** Event name → listener arguments. */
export interface AgentClientEvents {
  /** A mirrored connection starts; `data` and `closed` with its id follow. */
  opened: [OpenedMessage];
  data: [DataMessage];
  closed: [ClosedMessage];
  counters: [CountersMessage];
  /** A message of one of the streams a feature opened (see src/protocol/streams.ts). */
  stream: [StreamMessage];
  /** A non-fatal problem the agent reported; mirroring goes on. */
  warning: [ErrorMessage];
  /**
   * The session failed: a {@link ProtocolError}, an {@link AgentClientError}, or the stream's
   * error. Emitted at most once, never after close(); 'end' follows. As with any Node emitter,
   * an 'error' without a listener is thrown, so always listen.
   */
  error: [Error];
  /** The session is over, cleanly or not; emitted exactly once. */
  end: [];
}

interface PendingRequest {
  resolve: (body: WireValue) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout;
}

type Phase = 'handshake' | 'open' | 'closing' | 'ended';

/**
 * Runs the client side of a session over any duplex byte stream (a TCP socket, a port-forward
 * stream). Obtain one with {@link connectToAgent} or {@link AgentClient.start}, which resolve
 * once the handshake is done.
 */
export class AgentClient extends EventEmitter<AgentClientEvents> {
  readonly #stream: Duplex;
  readonly #decoder: FrameDecoder<AgentMessage>;
  readonly #writer: FrameWriter<ClientMessage>;
  readonly #deadAfterMs: number;
  readonly #requestTimeoutMs: number;
  readonly #keepAliveIntervalMs: number;
  #phase: Phase = 'handshake';
  #agent: AgentHelloMessage | undefined;
  #handshake!: { resolve: () => void; reject: (error: Error) => void };
  #handshakeTimer: NodeJS.Timeout | undefined;
  #keepAlive: NodeJS.Timeout | undefined;
  #watchdog: NodeJS.Timeout | undefined;
  #nonce = 0;
  #requestId = 0;
  /** When the hello was sent: its answer is the first clock sample. */
  #helloSentMicros = 0;
  /** When each unanswered ping was sent, by nonce: each pong is a clock sample. */
  readonly #pingsSentMicros = new Map<number, number>();
  readonly #agentClock = new AgentClock();
  /** Decoded messages not yet dispatched; those that came with the hello wait for the caller. */
  #queue: AgentMessage[] = [];
  #queueHead = 0;
  #dispatching = false;
  readonly #openConnections = new Set<number>();
  readonly #pending = new Map<string, PendingRequest[]>();
  #closed: Promise<void> | undefined;

  private constructor(stream: Duplex, options: AgentClientOptions) {
    super();
    this.#stream = stream;
    this.#decoder = new FrameDecoder(parseAgentMessage, options);
    // Control messages are rare and latency-sensitive: each is flushed at once.
    this.#writer = new FrameWriter(stream, clientMessageToWire, options);
    this.#deadAfterMs = options.deadAfterMs ?? 20_000;
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.#keepAliveIntervalMs = options.keepAliveIntervalMs ?? 5_000;
    if (stream instanceof net.Socket) stream.setNoDelay(true);
  }

  /** Runs the handshake over an open stream; rejects (and destroys the stream) if it fails. */
  static async start(stream: Duplex, options: AgentClientOptions): Promise<AgentClient> {
    const client = new AgentClient(stream, options);
    await client.#start(options);
    return client;
  }

  #start(options: AgentClientOptions): Promise<void> {
    const done = new Promise<void>((resolve, reject) => {
      this.#handshake = { resolve, reject };
    });
    const stream = this.#stream;
    stream.on('data', (chunk: Buffer) => this.#onChunk(chunk));
    stream.on('end', () => this.#onStreamGone());
    stream.on('close', () => this.#onStreamGone());
    stream.on('error', (error) =>
      this.#fail(
        new AgentClientError(
          'closed',
          `connection to the agent failed: ${error.message}`,
          undefined,
          { cause: error },
        ),
      ),
    );
    this.#handshakeTimer = setTimeout(
      () =>
        this.#fail(new AgentClientError('handshake-timeout', 'the agent did not answer the hello')),
      options.handshakeTimeoutMs ?? 10_000,
    );
    this.#helloSentMicros = monotonicMicros();
    this.#send({
      type: 'hello',
      version: PROTOCOL_VERSION,
      capabilities: [...(options.capabilities ?? CAPABILITIES)],
      client: options.clientName ?? 'mirrord',
      secret: options.secret,
    });
    this.#watch();
    return done;
  }

  /** The agent's hello: its version, capabilities, target and interfaces. */
  get agent(): AgentHelloMessage {
    return this.#agent as AgentHelloMessage; // set before start() resolves
  }

  /**
   * How long ago, in microseconds on our clock, the tap saw what `tapMicros` stamps (a data
   * message's): the mirror lag of bytes delivered now.
   */
  lagMicros(tapMicros: number): number {
    return monotonicMicros() - this.#agentClock.toLocal(tapMicros);
  }

  /** Resolves once the agent's tap copies connections to `port`. */
  async subscribe(port: number): Promise<void> {
    await this.#request(`subscribe ${port}`, `subscribe:${port}`, { type: 'subscribe', port });
  }

  /** Resolves once the agent copies no new connections to `port`. */
  async unsubscribe(port: number): Promise<void> {
    await this.#request(`unsubscribe ${port}`, `unsubscribe:${port}`, {
      type: 'unsubscribe',
      port,
    });
  }

  /**
   * Asks one of the agent's features (see src/features/); resolves with the reply's body, which
   * the feature's messages module checks. Fails with `request-failed` when the agent answered
   * with an error, and before anything is sent when the agent does not serve `feature`.
   */
  request(
    feature: string,
    body: WireValue,
    timeoutMs = this.#requestTimeoutMs,
  ): Promise<WireValue> {
    if (this.#phase === 'open' && !this.agent.capabilities.includes(feature)) {
      return Promise.reject(
        new AgentClientError(
          'request-failed',
          `the agent does not serve "${feature}" (it serves: ${this.agent.capabilities.join(', ')}): it is of another mirrord version`,
        ),
      );
    }
    const id = ++this.#requestId;
    return this.#request(
      `a ${feature} request`,
      `request:${id}`,
      { type: 'request', id, feature, body },
      timeoutMs,
    );
  }

  /** Sends a stream's message (see src/protocol/streams.ts); dropped once the session is over. */
  sendStream(message: StreamMessage): void {
    if (this.#phase === 'open') this.#send(message);
  }

  /** The connection to the agent is behind: streams stop reading their sockets until it drains. */
  get streamsBehind(): boolean {
    return this.#stream.writableNeedDrain;
  }

  onceDrained(listener: () => void): void {
    this.#stream.once('drain', listener);
  }

  /**
   * Says bye and ends the session; resolves once the stream is closed. Emits 'end', never
   * 'error'; no message event is emitted after this call.
   */
  close(): Promise<void> {
    if (this.#closed) return this.#closed;
    this.#closed = new Promise<void>((resolve) => {
      if (this.#phase === 'ended' || this.#stream.destroyed) {
        this.#finish();
        resolve();
        return;
      }
      this.#phase = 'closing';
      this.#send({ type: 'bye' });
      this.#stream.end();
      // The agent ends its side after bye; don't wait for it forever.
      const grace = setTimeout(() => this.#stream.destroy(), 2_000);
      this.#stream.once('close', () => {
        clearTimeout(grace);
        this.#finish();
        resolve();
      });
    });
    return this.#closed;
  }

  /** Sends `message` and waits for the answer settled under `key` (see #dispatch). */
  #request(
    what: string,
    key: string,
    message: ClientMessage,
    timeoutMs = this.#requestTimeoutMs,
  ): Promise<WireValue> {
    if (this.#phase !== 'open') {
      return Promise.reject(
        new AgentClientError('closed', `cannot send ${what}: the session is over`),
      );
    }
    return new Promise<WireValue>((resolve, reject) => {
      const queue = this.#pending.get(key) ?? [];
      const request: PendingRequest = {
        resolve,
        reject,
        timer: setTimeout(() => {
          queue.splice(queue.indexOf(request), 1);
          if (queue.length === 0) this.#pending.delete(key);
          reject(new AgentClientError('request-timeout', `the agent did not answer ${what}`));
        }, timeoutMs),
      };
      queue.push(request);
      this.#pending.set(key, queue);
      this.#send(message);
    });
  }

  #settle(key: string, error?: Error, body: WireValue = null): void {
    const queue = this.#pending.get(key);
    const request = queue?.shift();
    if (request === undefined) return; // answer to a request that already timed out
    if (queue?.length === 0) this.#pending.delete(key);
    clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(body);
  }

  #send(message: ClientMessage): void {
    this.#writer.send(message);
    this.#writer.flush();
  }

  #watch(): void {
    clearTimeout(this.#watchdog);
    this.#watchdog = setTimeout(
      () =>
        this.#fail(
          new AgentClientError(
            'dead-agent',
            `nothing received from the agent for ${this.#deadAfterMs} ms`,
          ),
        ),
      this.#deadAfterMs,
    );
  }

  #onChunk(chunk: Buffer): void {
    if (this.#phase === 'ended' || this.#phase === 'closing') return;
    this.#watchdog?.refresh();
    let messages: AgentMessage[];
    try {
      messages = this.#decoder.push(chunk);
    } catch (error) {
      this.#fail(error as ProtocolError);
      return;
    }
    for (const message of messages) this.#queue.push(message);
    if (this.#phase === 'handshake') this.#handshakeStep();
    else this.#drainQueue();
  }

  #handshakeStep(): void {
    const first = this.#queue[this.#queueHead];
    if (first === undefined) return;
    this.#queueHead++;
    if (first.type === 'refused') {
      this.#fail(
        new AgentClientError(
          'refused',
          `the agent refused the session (agent protocol v${first.version}, ours v${PROTOCOL_VERSION}): ${first.reason}`,
        ),
      );
      return;
    }
    if (first.type === 'error') {
      this.#fail(
        new AgentClientError('agent', `agent error: ${first.message}`, {
          code: first.code,
          message: first.message,
        }),
      );
      return;
    }
    if (first.type !== 'hello') {
      this.#fail(new ProtocolError(`expected the agent's hello, got ${first.type}`));
      return;
    }
    if (first.version !== PROTOCOL_VERSION) {
      this.#fail(
        new AgentClientError(
          'refused',
          `the agent speaks protocol v${first.version}, ours is v${PROTOCOL_VERSION}`,
        ),
      );
      return;
    }
    clearTimeout(this.#handshakeTimer);
    this.#agent = first;
    this.#agentClock.sample(this.#helloSentMicros, first.clockMicros, monotonicMicros());
    this.#phase = 'open';
    this.#startPinging();
    this.#handshake.resolve();
    // Messages that came with the hello wait until the caller, resumed by the handshake promise,
    // has attached its listeners.
    setImmediate(() => this.#drainQueue());
  }

  /**
   * Keep-alive pings, which are also clock samples: a few quick ones first (see
   * STARTUP_CLOCK_SAMPLES), then one every keep-alive interval.
   */
  #startPinging(): void {
    const startupInterval = Math.min(STARTUP_CLOCK_SAMPLE_INTERVAL_MS, this.#keepAliveIntervalMs);
    let startupPingsLeft = STARTUP_CLOCK_SAMPLES - 1;
    this.#ping();
    this.#keepAlive = setInterval(() => {
      this.#ping();
      if (--startupPingsLeft > 0) return;
      clearInterval(this.#keepAlive);
      this.#keepAlive = setInterval(() => this.#ping(), this.#keepAliveIntervalMs);
      this.#keepAlive.unref();
    }, startupInterval);
    this.#keepAlive.unref();
  }

  #ping(): void {
    const nonce = ++this.#nonce;
    this.#pingsSentMicros.set(nonce, monotonicMicros());
    // An agent that never answers (its socket stays backed up, see server.ts) must not grow
    // the map: the oldest entry goes.
    if (this.#pingsSentMicros.size > STARTUP_CLOCK_SAMPLES) {
      this.#pingsSentMicros.delete(this.#pingsSentMicros.keys().next().value as number);
    }
    this.#send({ type: 'ping', nonce });
  }

  #onPong(nonce: number, agentMicros: number): void {
    const sentMicros = this.#pingsSentMicros.get(nonce);
    if (sentMicros === undefined) return;
    // Pongs come in order: the pings before this one that got none (the agent skips pongs
    // while its socket is backed up) will not get one.
    for (const earlier of this.#pingsSentMicros.keys()) {
      if (earlier > nonce) break;
      this.#pingsSentMicros.delete(earlier);
    }
    this.#agentClock.sample(sentMicros, agentMicros, monotonicMicros());
  }

  /** Dispatches the queued messages while the session is open. */
  #drainQueue(): void {
    if (!this.#dispatching) {
      this.#dispatching = true;
      try {
        while (this.#phase === 'open' && this.#queueHead < this.#queue.length) {
          const message = this.#queue[this.#queueHead++] as AgentMessage;
          this.#dispatch(message);
        }
      } catch (error) {
        if (!(error instanceof ProtocolError)) throw error; // a listener's own error
        this.#fail(error);
      } finally {
        this.#dispatching = false;
        if (this.#queueHead === this.#queue.length) {
          this.#queue = [];
          this.#queueHead = 0;
        }
      }
    }
  }

  #dispatch(message: AgentMessage): void {
    switch (message.type) {
      case 'data':
        if (!this.#openConnections.has(message.id)) {
          throw new ProtocolError(`data for connection ${message.id}, which is not open`);
        }
        this.emit('data', message);
        return;
      case 'opened':
        if (this.#openConnections.has(message.id)) {
          throw new ProtocolError(`connection ${message.id} opened twice`);
        }
        this.#openConnections.add(message.id);
        this.emit('opened', message);
        return;
      case 'closed':
        if (!this.#openConnections.delete(message.id)) {
          throw new ProtocolError(`close of connection ${message.id}, which is not open`);
        }
        this.emit('closed', message);
        return;
      case 'counters':
        this.emit('counters', message);
        return;
      case 'error':
        if (message.fatal) {
          this.#fail(
            new AgentClientError('agent', `agent error: ${message.message}`, {
              code: message.code,
              message: message.message,
            }),
          );
        } else {
          this.emit('warning', message);
        }
        return;
      case 'subscribed':
        this.#settle(`subscribe:${message.port}`);
        return;
      case 'subscribeFailed':
        this.#settle(
          `subscribe:${message.port}`,
          new AgentClientError(
            'subscribe-failed',
            `cannot mirror port ${message.port}: ${message.reason}`,
          ),
        );
        return;
      case 'unsubscribed':
        this.#settle(`unsubscribe:${message.port}`);
        return;
      case 'pong':
        // Any byte received already proved the agent alive; a pong is also a clock sample.
        this.#onPong(message.nonce, message.clockMicros);
        return;
      case 'reply':
        this.#settle(
          `request:${message.id}`,
          message.error === null
            ? undefined
            : new AgentClientError('request-failed', `the agent: ${message.error}`),
          message.body,
        );
        return;
      case 'hello':
      case 'refused':
        throw new ProtocolError(`unexpected ${message.type} after the handshake`);
      default:
        this.emit('stream', message);
    }
  }

  #onStreamGone(): void {
    if (this.#phase === 'closing' || this.#phase === 'ended') return;
    this.#fail(
      new AgentClientError('closed', 'the agent closed the connection without saying why'),
    );
  }

  #fail(error: Error): void {
    if (this.#phase === 'ended' || this.#phase === 'closing') return;
    const wasOpen = this.#phase === 'open';
    this.#finish(error);
    this.#stream.destroy();
    if (wasOpen) {
      this.emit('error', error);
      this.emit('end');
    } else {
      this.#handshake.reject(error);
    }
  }

  /** Releases everything; emits 'end' for a clean close (#fail emits its own). */
  #finish(error?: Error): void {
    if (this.#phase === 'ended') return;
    const clean = error === undefined && this.#phase !== 'handshake';
    this.#phase = 'ended';
    clearTimeout(this.#handshakeTimer);
    clearInterval(this.#keepAlive);
    clearTimeout(this.#watchdog);
    this.#writer.close();
    this.#queue = [];
    this.#queueHead = 0;
    const reason = error ?? new AgentClientError('closed', 'the session was closed');
    for (const requests of this.#pending.values()) {
      for (const request of requests) {
        clearTimeout(request.timer);
        request.reject(reason);
      }
    }
    this.#pending.clear();
    if (clean) this.emit('end');
  }
}

/** Opens a TCP connection to an agent and resolves once the handshake is done. */
export function connectToAgent(
  host: string,
  port: number,
  options: ConnectOptions,
): Promise<AgentClient> {
  return new Promise<AgentClient>((resolve, reject) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new AgentClientError('closed', `connecting to the agent at ${host}:${port} timed out`),
      );
    }, options.connectTimeoutMs ?? 10_000);
    const onError = (error: Error): void => {
      clearTimeout(timer);
      reject(
        new AgentClientError(
          'closed',
          `cannot connect to the agent at ${host}:${port}: ${error.message}`,
          undefined,
          {
            cause: error,
          },
        ),
      );
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', onError);
      AgentClient.start(socket, options).then(resolve, reject);
    });
  });
}
