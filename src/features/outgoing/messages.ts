/**
 * The `outgoing` feature's messages: connections and look-ups the agent makes from inside the
 * target's network namespace for the app. A request body is `[operation, ...arguments]`:
 * - `['connect', stream, family, address, port]`: a TCP connection; once it is up, its bytes
 *   are the session's stream `stream` (src/protocol/streams.ts);
 * - `['udp', stream, family, address, port]`: a UDP socket connected to that destination, its
 *   datagrams the stream's;
 * - `['resolve', name, family]`: a name as the target's resolver resolves it.
 * A connect or udp reply is `[errno, localAddress, localPort]`: errno null when the socket is
 * up (then where it is bound in the target), else the name the app's connect fails with, as
 * the target's own would have (`ECONNREFUSED`, `ETIMEDOUT`, `EHOSTUNREACH`, …). A resolve reply
 * is `[error, canonicalName, addresses]`: error null or getaddrinfo's (`NONAME`, `AGAIN`, …,
 * without `EAI_`).
 */
import { isIP } from 'node:net';
import { ProtocolError, type WireValue } from '../../protocol/messages.js';

export const OUTGOING_FEATURE = 'outgoing';

export type Family = 4 | 6;

export type OutgoingRequest =
  | { op: 'connect' | 'udp'; stream: number; family: Family; address: string; port: number }
  | { op: 'resolve'; name: string; family: 0 | Family };

export type Connection =
  | { errno: null; localAddress: string; localPort: number }
  | { errno: string; localAddress: null; localPort: 0 };

export type Resolution =
  | { error: null; canonicalName: string | null; addresses: string[] }
  | { error: string; canonicalName: null; addresses: [] };

function bad(what: string): never {
  throw new ProtocolError(`outgoing: ${what}`);
}

const count = (v: unknown, what: string): number =>
  typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : bad(what);

export function outgoingRequestBody(request: OutgoingRequest): WireValue {
  if (request.op === 'resolve') return ['resolve', request.name, request.family];
  return [request.op, request.stream, request.family, request.address, request.port];
}

/** Checks a request's body (the agent's side); throws {@link ProtocolError}. */
export function parseOutgoingRequest(body: WireValue): OutgoingRequest {
  if (!Array.isArray(body) || typeof body[0] !== 'string') bad('expected [operation, …]');
  const [op, a, b, c, d] = body as unknown[];
  switch (op) {
    case 'connect':
    case 'udp': {
      if (b !== 4 && b !== 6) bad(`${op}: expected family 4 or 6`);
      if (typeof c !== 'string' || isIP(c) !== b) bad(`${op}: expected an IPv${b} address`);
      const port = count(d, `${op}: expected a port`);
      if (port < 1 || port > 65535) bad(`${op}: port ${port} is not from 1 to 65535`);
      return { op, stream: count(a, `${op}: expected a stream id`), family: b, address: c, port };
    }
    case 'resolve':
      if (typeof a !== 'string' || a.length === 0) bad('resolve: expected a name');
      if (b !== 0 && b !== 4 && b !== 6) bad('resolve: expected family 0, 4 or 6');
      return { op, name: a, family: b };
    default:
      return bad(`no operation ${String(op)}`);
  }
}

export function connectionReplyBody(connection: Connection): WireValue {
  return [connection.errno, connection.localAddress, connection.localPort];
}

/** Checks the agent's reply to connect or udp (the CLI's side); throws {@link ProtocolError}. */
export function parseConnectionReply(body: WireValue): Connection {
  if (!Array.isArray(body) || body.length !== 3)
    bad('connect reply: expected [errno, address, port]');
  const [errno, address, port] = body as unknown[];
  if (typeof errno === 'string') return { errno, localAddress: null, localPort: 0 };
  if (errno !== null || typeof address !== 'string' || isIP(address) === 0) {
    bad('connect reply: expected an errno, or the local address and port');
  }
  return { errno: null, localAddress: address, localPort: count(port, 'connect reply: port') };
}

export function resolutionReplyBody(resolution: Resolution): WireValue {
  return [resolution.error, resolution.canonicalName, resolution.addresses];
}

/** Checks the agent's reply to resolve (the CLI's side); throws {@link ProtocolError}. */
export function parseResolutionReply(body: WireValue): Resolution {
  if (!Array.isArray(body) || body.length !== 3)
    bad('resolve reply: expected [error, name, addresses]');
  const [error, name, addresses] = body as unknown[];
  if (typeof error === 'string') return { error, canonicalName: null, addresses: [] };
  if (
    error !== null ||
    (name !== null && typeof name !== 'string') ||
    !Array.isArray(addresses) ||
    !addresses.every((address) => typeof address === 'string' && isIP(address) !== 0)
  ) {
    bad('resolve reply: expected an error, or a name and addresses');
  }
  return { error: null, canonicalName: name, addresses: addresses as string[] };
}
