/**
 * Every message of the agent protocol, both directions, with its wire form and the runtime checks
 * that turn a decoded msgpack value back into a typed message.
 *
 * On the wire a message is a msgpack array `[typeCode, ...fields]`, not a map: the data path
 * carries ≥ 250 MB/s of small `data` messages, and positional arrays skip writing, reading and
 * hashing a key string per field (and keep a `data` message's overhead under 25 bytes). The price is that
 * fields are identified by position, so every layout below is fixed for a protocol version and
 * only `hello` may grow (see {@link PROTOCOL_VERSION}).
 */
import { isIP } from 'node:net';

/**
 * Bumped on any change of a message layout or meaning. Both ends must speak the same version:
 * the agent answers a different one with `refused`. The leading `[code, version]` of both
 * `hello` messages never changes, and `hello` tolerates trailing fields, so that a newer peer
 * is told "wrong version" instead of "malformed message".
 */
export const PROTOCOL_VERSION = 6;

/**
 * What this build supports. Informational: a peer must tolerate names it does not know.
 * `ipv6`: connections to IPv6 addresses are mirrored. `mid-stream`: connections already open
 * when the tap started are mirrored from the first byte seen (`opened.midStream`). The agent
 * adds the name of each feature it serves (`request.feature`, see src/features/), so that a
 * CLI can tell a user what an older or newer agent lacks before it asks.
 */
export const CAPABILITIES: readonly string[] = ['ipv6', 'mid-stream'];

/** The peer sent something this protocol does not allow; the session cannot continue. */
export class ProtocolError extends Error {
  override name = 'ProtocolError';
}

export interface Endpoint {
  address: string;
  port: number;
}

// ---- client (CLI) → agent ----

/**
 * First message of a session. Requests may follow it at once; the agent acts on them after
 * accepting the hello.
 */
export interface ClientHelloMessage {
  type: 'hello';
  version: number;
  capabilities: string[];
  /** Free text for the agent's logs, e.g. "mirrord-cli 0.1.0". */
  client: string;
  /**
   * The session secret the agent was started with: only the CLI that placed the agent holds it
   * (see src/protocol/agent-launch.ts). The agent refuses a hello without the right one.
   */
  secret: string;
}

/** Start copying connections whose server port is `port`; answered by `subscribed` or `subscribeFailed`. */
export interface SubscribeMessage {
  type: 'subscribe';
  port: number;
}

/** Stop copying new connections to `port`; answered by `unsubscribed`. */
export interface UnsubscribeMessage {
  type: 'unsubscribe';
  port: number;
}

/** Keep-alive; the agent answers with `pong` carrying the same nonce. */
export interface PingMessage {
  type: 'ping';
  nonce: number;
}

/** The client is leaving on purpose: the agent ends the session and cleans up. */
export interface ByeMessage {
  type: 'bye';
}

/**
 * A request to one of the agent's features (src/features/<feature>/): the envelope is the
 * protocol's, `body` the feature's own, which its messages module checks. Answered by one
 * `reply` with the same id.
 */
export interface RequestMessage {
  type: 'request';
  /** Chosen by the client, unique among its unanswered requests. */
  id: number;
  feature: string;
  body: WireValue;
}

// ---- streams, both ways ----

/**
 * A stream is a byte stream (a TCP connection) or a sequence of datagrams (a UDP socket) that a
 * feature opened with a request (src/features/outgoing/): each end holds a socket, and these
 * messages carry what one end's socket gave to the other end's. Ids are chosen by the client,
 * unique in the session. For a byte stream, `streamCredit` says how many bytes its receiver
 * has handed to its socket: a sender stops reading its socket once a window of bytes is uncredited (see
 * src/protocol/streams.ts), so that one slow socket holds back its own stream, never the
 * session. A datagram stream keeps each datagram one `streamData` and takes no credit.
 */
export interface StreamDataMessage {
  type: 'streamData';
  stream: number;
  /** A view into the received frame, as DataMessage's. */
  bytes: Buffer;
}

/** The sender's socket ended its side (a FIN): the receiver shuts down its socket's writing. */
export interface StreamEndMessage {
  type: 'streamEnd';
  stream: number;
}

/**
 * The stream is over at once: the sender's socket failed or was closed without an end, or
 * the sender gave it up. `errno` names why (`ECONNRESET`, …), null when there is nothing to
 * tell. The receiver resets its socket (an RST), and both forget the stream.
 */
export interface StreamResetMessage {
  type: 'streamReset';
  stream: number;
  errno: string | null;
}

/** The receiver handed `bytes` more of the stream to its socket. */
export interface StreamCreditMessage {
  type: 'streamCredit';
  stream: number;
  bytes: number;
}

export type StreamMessage =
  StreamDataMessage | StreamEndMessage | StreamResetMessage | StreamCreditMessage;

export type ClientMessage =
  | ClientHelloMessage
  | SubscribeMessage
  | UnsubscribeMessage
  | PingMessage
  | ByeMessage
  | RequestMessage
  | StreamMessage;

// ---- agent → client (CLI) ----

/** Accepts the client's hello. */
export interface AgentHelloMessage {
  type: 'hello';
  version: number;
  capabilities: string[];
  /** Free text, e.g. "mirrord-agent 0.1.0 on node-3". */
  agent: string;
  /** The target as the agent resolved it, e.g. "pid 4242 (container 3f2a…)". */
  target: string;
  /** Interfaces of the target's network namespace the tap is attached to. */
  interfaces: string[];
  /** The agent's clock (see clock.ts) when it sent this: the client's first clock sample. */
  clockMicros: number;
}

/** Rejects the client's hello; the agent closes the session right after. */
export interface RefusedMessage {
  type: 'refused';
  /** The version the agent speaks, so the CLI can say which side to upgrade. */
  version: number;
  reason: string;
}

export interface SubscribedMessage {
  type: 'subscribed';
  port: number;
}

/** The tap could not be set up for this port; the session goes on. */
export interface SubscribeFailedMessage {
  type: 'subscribeFailed';
  port: number;
  reason: string;
}

export interface UnsubscribedMessage {
  type: 'unsubscribed';
  port: number;
}

/** A client→server TCP connection to a subscribed port that the agent now mirrors. */
export interface OpenedMessage {
  type: 'opened';
  /** Unique within the session; not reused after `closed`. */
  id: number;
  family: 4 | 6;
  /** The remote peer that opened the connection in the target. */
  client: Endpoint;
  /** The target's address and (subscribed) port. */
  server: Endpoint;
  /** Name of the interface in the target's netns the connection arrived on (`eth0`, `lo`…). */
  interface: string;
  /** The handshake was not seen: the stream starts at an arbitrary byte. */
  midStream: boolean;
}

/**
 * The next bytes the client sent on connection `id`, in order and without gaps unless a
 * `closed` with `reason: 'broken'` follows.
 */
export interface DataMessage {
  type: 'data';
  id: number;
  /**
   * A view into the received frame, not a copy: holding it keeps that frame's memory alive
   * (at most one frame, ≤ 16 MiB; usually one socket read). Copy it if you keep it for long.
   */
  bytes: Buffer;
  /**
   * When the tap saw the first of these bytes arrive at the target, on the agent's clock (see
   * clock.ts): the start of the mirror lag.
   */
  tapMicros: number;
}

// The type is made from the list the parser checks, so the two cannot differ.
const CLOSE_REASONS = ['fin', 'rst', 'expired', 'broken'] as const;

/**
 * Why a mirrored connection ended. `fin`/`rst`: the client closed or reset it. `expired`: idle
 * too long, the agent gave up on it. `broken`: the agent could not deliver the stream in order
 * (bytes missing: a dropped segment, a memory limit) and stopped mirroring it.
 */
export type CloseReason = (typeof CLOSE_REASONS)[number];

export interface ClosedMessage {
  type: 'closed';
  id: number;
  reason: CloseReason;
  /** Bytes of this connection's client stream that were never delivered; 0 when complete. */
  gapBytes: number;
}

/**
 * Cumulative since the session started (but for the levels); sent periodically by the agent.
 *
 * Every payload byte the tap copied is counted once, so that at any moment
 * `bytesCopied = bytesMirrored + bytesIgnored + bytesDroppedAgent + bytesInAgent`; when nothing
 * is in flight `bytesInAgent` is 0 and each copied byte is accounted for. (Bytes the tap could
 * not copy are `bytesDroppedKernel`, not part of `bytesCopied`.)
 */
export interface Counters {
  /** Segments (and their payload bytes) the tap copied to the agent. */
  segmentsCopied: number;
  bytesCopied: number;
  /** Segments the tap saw but could not copy (ring buffer full). */
  segmentsDroppedKernel: number;
  bytesDroppedKernel: number;
  /** Connections the agent gave up on (`closed` with `broken`: memory limits, gaps). */
  connectionsDroppedAgent: number;
  /**
   * Copied bytes of client streams the agent could not send: bytes behind a gap or over a
   * memory limit when it gave up on their connection, bytes its clients sent after that, bytes
   * waiting when the session fell behind or ended. (The gaps themselves were never copied:
   * `gapBytes` of each `closed` tells their size.)
   */
  bytesDroppedAgent: number;
  /** Connections mirrored right now (a level, not a total). */
  connectionsOpen: number;
  /** Bytes of client streams sent to the session in `data` messages. */
  bytesMirrored: number;
  /**
   * Copied bytes that are no part of any client stream as the target read it: retransmitted or
   * overlapping copies of bytes already taken, bytes past a FIN, bytes of a connection after its
   * FIN or RST (late retransmits), an RST's payload.
   */
  bytesIgnored: number;
  /**
   * Copied bytes not yet sent nor dropped nor ignored (a level): in the ring buffer or a batch,
   * waiting behind a hole in their stream, or gathered for the end of the tap's batch.
   */
  bytesInAgent: number;
}

export interface CountersMessage extends Counters {
  type: 'counters';
}

/**
 * Something went wrong in the agent. `fatal`: the agent ends the session right after this
 * message; otherwise it is a warning and mirroring goes on.
 */
export interface ErrorMessage {
  type: 'error';
  /** Stable, machine-readable: `protocol`, `idle-timeout`, `backlog`, or the agent's own codes. */
  code: string;
  message: string;
  fatal: boolean;
}

export interface PongMessage {
  type: 'pong';
  nonce: number;
  /** The agent's clock when it answered: with the ping's round trip, a clock sample. */
  clockMicros: number;
}

/** The answer to a `request`: its feature's body, or why there is none. */
export interface ReplyMessage {
  type: 'reply';
  id: number;
  /** Null when the request was served; else what went wrong, for a human. */
  error: string | null;
  body: WireValue;
}

export type AgentMessage =
  | AgentHelloMessage
  | RefusedMessage
  | SubscribedMessage
  | SubscribeFailedMessage
  | UnsubscribedMessage
  | OpenedMessage
  | DataMessage
  | ClosedMessage
  | CountersMessage
  | ErrorMessage
  | PongMessage
  | ReplyMessage
  | StreamMessage;

// ---- wire form ----

/** One field of a message on the wire; only these msgpack kinds are ever used (no maps). */
export type WireValue = number | boolean | string | null | Uint8Array | readonly WireValue[];
export type WireMessage = readonly WireValue[];

/**
 * Type codes. Client and agent codes never overlap, so a message sent in the wrong direction is
 * reported as such instead of being read with the other direction's layout.
 */
export const MessageCode = {
  clientHello: 0x01,
  subscribe: 0x02,
  unsubscribe: 0x03,
  ping: 0x04,
  bye: 0x05,
  request: 0x06,
  clientStreamData: 0x07,
  clientStreamEnd: 0x08,
  clientStreamReset: 0x09,
  clientStreamCredit: 0x0a,
  agentHello: 0x10,
  refused: 0x11,
  subscribed: 0x12,
  subscribeFailed: 0x13,
  unsubscribed: 0x14,
  opened: 0x15,
  data: 0x16,
  closed: 0x17,
  counters: 0x18,
  error: 0x19,
  pong: 0x1a,
  reply: 0x1b,
  agentStreamData: 0x1c,
  agentStreamEnd: 0x1d,
  agentStreamReset: 0x1e,
  agentStreamCredit: 0x1f,
} as const;

const C = MessageCode;

export function clientMessageToWire(m: ClientMessage): WireMessage {
  switch (m.type) {
    case 'hello':
      return [C.clientHello, m.version, m.capabilities, m.client, m.secret];
    case 'subscribe':
      return [C.subscribe, m.port];
    case 'unsubscribe':
      return [C.unsubscribe, m.port];
    case 'ping':
      return [C.ping, m.nonce];
    case 'bye':
      return [C.bye];
    case 'request':
      return [C.request, m.id, m.feature, m.body];
    default:
      return streamMessageToWire(m, CLIENT_STREAM_CODES);
  }
}

/** Each direction's codes of the stream messages, by type. */
type StreamCodes = Record<StreamMessage['type'], number>;
const CLIENT_STREAM_CODES: StreamCodes = {
  streamData: C.clientStreamData,
  streamEnd: C.clientStreamEnd,
  streamReset: C.clientStreamReset,
  streamCredit: C.clientStreamCredit,
};
const AGENT_STREAM_CODES: StreamCodes = {
  streamData: C.agentStreamData,
  streamEnd: C.agentStreamEnd,
  streamReset: C.agentStreamReset,
  streamCredit: C.agentStreamCredit,
};

function streamMessageToWire(m: StreamMessage, codes: StreamCodes): WireMessage {
  switch (m.type) {
    case 'streamData':
      return [codes.streamData, m.stream, m.bytes];
    case 'streamEnd':
      return [codes.streamEnd, m.stream];
    case 'streamReset':
      return [codes.streamReset, m.stream, m.errno];
    case 'streamCredit':
      return [codes.streamCredit, m.stream, m.bytes];
  }
}

/** The stream message `w` is, if its code is one of `codes`'. */
function parseStreamMessage(w: readonly unknown[], code: number, codes: StreamCodes) {
  switch (code) {
    case codes.streamData: {
      arity(w, 'streamData', 2);
      const bytes = w[2];
      if (!(bytes instanceof Uint8Array)) return fail('streamData', 'bytes', 'binary', bytes);
      return {
        type: 'streamData' as const,
        stream: uint(w, 1, 'streamData', 'stream'),
        bytes: Buffer.isBuffer(bytes)
          ? bytes
          : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
      };
    }
    case codes.streamEnd:
      arity(w, 'streamEnd', 1);
      return { type: 'streamEnd' as const, stream: uint(w, 1, 'streamEnd', 'stream') };
    case codes.streamReset: {
      arity(w, 'streamReset', 2);
      const errno = w[2];
      if (errno !== null && typeof errno !== 'string') {
        return fail('streamReset', 'errno', 'nil or a string', errno);
      }
      return {
        type: 'streamReset' as const,
        stream: uint(w, 1, 'streamReset', 'stream'),
        errno,
      };
    }
    case codes.streamCredit:
      arity(w, 'streamCredit', 2);
      return {
        type: 'streamCredit' as const,
        stream: uint(w, 1, 'streamCredit', 'stream'),
        bytes: uint(w, 2, 'streamCredit', 'bytes'),
      };
    default:
      return undefined;
  }
}

export function agentMessageToWire(m: AgentMessage): WireMessage {
  switch (m.type) {
    case 'data':
      return [C.data, m.id, m.bytes, m.tapMicros];
    case 'hello':
      return [
        C.agentHello,
        m.version,
        m.capabilities,
        m.agent,
        m.target,
        m.interfaces,
        m.clockMicros,
      ];
    case 'refused':
      return [C.refused, m.version, m.reason];
    case 'subscribed':
      return [C.subscribed, m.port];
    case 'subscribeFailed':
      return [C.subscribeFailed, m.port, m.reason];
    case 'unsubscribed':
      return [C.unsubscribed, m.port];
    case 'opened':
      return [
        C.opened,
        m.id,
        m.family,
        m.client.address,
        m.client.port,
        m.server.address,
        m.server.port,
        m.interface,
        m.midStream,
      ];
    case 'closed':
      return [C.closed, m.id, m.reason, m.gapBytes];
    case 'counters':
      return [
        C.counters,
        m.segmentsCopied,
        m.bytesCopied,
        m.segmentsDroppedKernel,
        m.bytesDroppedKernel,
        m.connectionsDroppedAgent,
        m.bytesDroppedAgent,
        m.connectionsOpen,
        m.bytesMirrored,
        m.bytesIgnored,
        m.bytesInAgent,
      ];
    case 'error':
      return [C.error, m.code, m.message, m.fatal];
    case 'pong':
      return [C.pong, m.nonce, m.clockMicros];
    case 'reply':
      return [C.reply, m.id, m.error, m.body];
    default:
      return streamMessageToWire(m, AGENT_STREAM_CODES);
  }
}

// ---- validation (also of the layer channel's messages, src/session/layer-messages.ts) ----

const CODE_NAMES = new Map<number, string>(Object.entries(MessageCode).map(([k, v]) => [v, k]));

function describe(value: unknown): string {
  if (value === null) return 'nil';
  if (typeof value === 'string') {
    return `string ${JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}…` : value)}`;
  }
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') {
    return `${typeof value} ${String(value)}`;
  }
  if (value instanceof Uint8Array) return `binary (${value.length} bytes)`;
  if (Array.isArray(value)) return `array (${value.length} elements)`;
  return typeof value;
}

function fail(message: string, field: string, expected: string, value: unknown): never {
  throw new ProtocolError(`${message}.${field}: expected ${expected}, got ${describe(value)}`);
}

export function arity(
  wire: readonly unknown[],
  message: string,
  fields: number,
  exact = true,
): void {
  if (wire.length - 1 < fields || (exact && wire.length - 1 !== fields)) {
    throw new ProtocolError(
      `${message}: expected ${exact ? '' : 'at least '}${fields} fields, got ${wire.length - 1}`,
    );
  }
}

export function uint(wire: readonly unknown[], i: number, message: string, field: string): number {
  const v = wire[i];
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return v;
  return fail(message, field, 'a non-negative integer', v);
}

export function port(wire: readonly unknown[], i: number, message: string, field: string): number {
  const v = wire[i];
  if (typeof v === 'number' && Number.isInteger(v) && v >= 1 && v <= 65535) return v;
  return fail(message, field, 'a port number (1–65535)', v);
}

export function str(wire: readonly unknown[], i: number, message: string, field: string): string {
  const v = wire[i];
  if (typeof v === 'string') return v;
  return fail(message, field, 'a string', v);
}

function bool(wire: readonly unknown[], i: number, message: string, field: string): boolean {
  const v = wire[i];
  if (typeof v === 'boolean') return v;
  return fail(message, field, 'a boolean', v);
}

function strings(wire: readonly unknown[], i: number, message: string, field: string): string[] {
  const v = wire[i];
  if (Array.isArray(v) && v.every((s) => typeof s === 'string')) return v as string[];
  return fail(message, field, 'an array of strings', v);
}

function address(
  wire: readonly unknown[],
  i: number,
  family: 4 | 6,
  message: string,
  field: string,
): string {
  const v = wire[i];
  if (typeof v === 'string' && isIP(v) === family) return v;
  return fail(message, field, `an IPv${family} address`, v);
}

export function messageCode(wire: unknown): readonly unknown[] & { 0: number } {
  if (!Array.isArray(wire) || wire.length === 0) {
    throw new ProtocolError(`expected a message [typeCode, ...fields], got ${describe(wire)}`);
  }
  if (typeof wire[0] !== 'number') {
    throw new ProtocolError(`message type code: expected an integer, got ${describe(wire[0])}`);
  }
  return wire as unknown[] & { 0: number };
}

function wrongDirection(code: number, from: string): never {
  const name = CODE_NAMES.get(code);
  throw new ProtocolError(
    name === undefined
      ? `unknown message type code ${code} from the ${from}`
      : `message type ${name} (code ${code}) is not sent by the ${from}`,
  );
}

/** Validates one decoded wire message from the client; throws {@link ProtocolError}. */
export function parseClientMessage(value: unknown): ClientMessage {
  const w = messageCode(value);
  switch (w[0]) {
    case C.clientHello:
      arity(w, 'hello', 3, false);
      return {
        type: 'hello',
        version: uint(w, 1, 'hello', 'version'),
        capabilities: strings(w, 2, 'hello', 'capabilities'),
        client: str(w, 3, 'hello', 'client'),
        // Absent from an older client's hello, which its version refuses before the secret.
        secret: w.length > 4 ? str(w, 4, 'hello', 'secret') : '',
      };
    case C.subscribe:
      arity(w, 'subscribe', 1);
      return { type: 'subscribe', port: port(w, 1, 'subscribe', 'port') };
    case C.unsubscribe:
      arity(w, 'unsubscribe', 1);
      return { type: 'unsubscribe', port: port(w, 1, 'unsubscribe', 'port') };
    case C.ping:
      arity(w, 'ping', 1);
      return { type: 'ping', nonce: uint(w, 1, 'ping', 'nonce') };
    case C.bye:
      arity(w, 'bye', 0);
      return { type: 'bye' };
    case C.request:
      arity(w, 'request', 3);
      return {
        type: 'request',
        id: uint(w, 1, 'request', 'id'),
        feature: str(w, 2, 'request', 'feature'),
        body: w[3] as WireValue, // the feature checks it
      };
    default:
      return parseStreamMessage(w, w[0], CLIENT_STREAM_CODES) ?? wrongDirection(w[0], 'client');
  }
}

/** Validates one decoded wire message from the agent; throws {@link ProtocolError}. */
export function parseAgentMessage(value: unknown): AgentMessage {
  const w = messageCode(value);
  switch (w[0]) {
    case C.data: {
      arity(w, 'data', 3);
      const id = uint(w, 1, 'data', 'id');
      const bytes = w[2];
      if (!(bytes instanceof Uint8Array)) return fail('data', 'bytes', 'binary', bytes);
      return {
        type: 'data',
        id,
        bytes: Buffer.isBuffer(bytes)
          ? bytes
          : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
        tapMicros: uint(w, 3, 'data', 'tapMicros'),
      };
    }
    case C.agentHello:
      arity(w, 'hello', 6, false);
      return {
        type: 'hello',
        version: uint(w, 1, 'hello', 'version'),
        capabilities: strings(w, 2, 'hello', 'capabilities'),
        agent: str(w, 3, 'hello', 'agent'),
        target: str(w, 4, 'hello', 'target'),
        interfaces: strings(w, 5, 'hello', 'interfaces'),
        clockMicros: uint(w, 6, 'hello', 'clockMicros'),
      };
    case C.refused:
      arity(w, 'refused', 2);
      return {
        type: 'refused',
        version: uint(w, 1, 'refused', 'version'),
        reason: str(w, 2, 'refused', 'reason'),
      };
    case C.subscribed:
      arity(w, 'subscribed', 1);
      return { type: 'subscribed', port: port(w, 1, 'subscribed', 'port') };
    case C.subscribeFailed:
      arity(w, 'subscribeFailed', 2);
      return {
        type: 'subscribeFailed',
        port: port(w, 1, 'subscribeFailed', 'port'),
        reason: str(w, 2, 'subscribeFailed', 'reason'),
      };
    case C.unsubscribed:
      arity(w, 'unsubscribed', 1);
      return { type: 'unsubscribed', port: port(w, 1, 'unsubscribed', 'port') };
    case C.opened: {
      arity(w, 'opened', 8);
      const family = w[2];
      if (family !== 4 && family !== 6) return fail('opened', 'family', '4 or 6', family);
      return {
        type: 'opened',
        id: uint(w, 1, 'opened', 'id'),
        family,
        client: {
          address: address(w, 3, family, 'opened', 'client.address'),
          port: port(w, 4, 'opened', 'client.port'),
        },
        server: {
          address: address(w, 5, family, 'opened', 'server.address'),
          port: port(w, 6, 'opened', 'server.port'),
        },
        interface: str(w, 7, 'opened', 'interface'),
        midStream: bool(w, 8, 'opened', 'midStream'),
      };
    }
    case C.closed: {
      arity(w, 'closed', 3);
      const reason = w[2];
      if (typeof reason !== 'string' || !(CLOSE_REASONS as readonly string[]).includes(reason)) {
        return fail('closed', 'reason', CLOSE_REASONS.join('|'), reason);
      }
      return {
        type: 'closed',
        id: uint(w, 1, 'closed', 'id'),
        reason: reason as CloseReason,
        gapBytes: uint(w, 3, 'closed', 'gapBytes'),
      };
    }
    case C.counters:
      arity(w, 'counters', 10);
      return {
        type: 'counters',
        segmentsCopied: uint(w, 1, 'counters', 'segmentsCopied'),
        bytesCopied: uint(w, 2, 'counters', 'bytesCopied'),
        segmentsDroppedKernel: uint(w, 3, 'counters', 'segmentsDroppedKernel'),
        bytesDroppedKernel: uint(w, 4, 'counters', 'bytesDroppedKernel'),
        connectionsDroppedAgent: uint(w, 5, 'counters', 'connectionsDroppedAgent'),
        bytesDroppedAgent: uint(w, 6, 'counters', 'bytesDroppedAgent'),
        connectionsOpen: uint(w, 7, 'counters', 'connectionsOpen'),
        bytesMirrored: uint(w, 8, 'counters', 'bytesMirrored'),
        bytesIgnored: uint(w, 9, 'counters', 'bytesIgnored'),
        bytesInAgent: uint(w, 10, 'counters', 'bytesInAgent'),
      };
    case C.error:
      arity(w, 'error', 3);
      return {
        type: 'error',
        code: str(w, 1, 'error', 'code'),
        message: str(w, 2, 'error', 'message'),
        fatal: bool(w, 3, 'error', 'fatal'),
      };
    case C.pong:
      arity(w, 'pong', 2);
      return {
        type: 'pong',
        nonce: uint(w, 1, 'pong', 'nonce'),
        clockMicros: uint(w, 2, 'pong', 'clockMicros'),
      };
    case C.reply: {
      arity(w, 'reply', 3);
      const error = w[2];
      if (error !== null && typeof error !== 'string') {
        return fail('reply', 'error', 'nil or a string', error);
      }
      return {
        type: 'reply',
        id: uint(w, 1, 'reply', 'id'),
        error,
        body: w[3] as WireValue, // the feature checks it
      };
    }
    default:
      return parseStreamMessage(w, w[0], AGENT_STREAM_CODES) ?? wrongDirection(w[0], 'agent');
  }
}
