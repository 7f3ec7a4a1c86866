/**
 * What the kernel still holds of replayed connections: the bytes our socket sent that the app's
 * socket has not acknowledged, and the bytes the app's socket received that the app has not read.
 *
 * Node tells when a write reached the kernel, not when the app read it; yet a reset we send
 * discards both queues, and an app that is behind (a pre-fork server under load is seconds
 * behind) still has tens of kilobytes of a connection unread when its client resets it. So before
 * the replay resets a connection, and to know what a reset cost, it looks here. The app is our
 * child, in our network namespace, so both sockets are in this namespace's /proc/net/tcp and
 * /proc/net/tcp6 (an IPv4 connection to a dual-stack listener is an IPv6 socket there, with
 * IPv4-mapped addresses).
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import net from 'node:net';
import { endianness } from 'node:os';
import type { Endpoint } from '../protocol/messages.js';

/** TCP states as /proc/net/tcp numbers them (include/net/tcp_states.h). */
const FIN_WAIT1 = 0x04;
const TIME_WAIT = 0x06;
const CLOSE_WAIT = 0x08;
const LAST_ACK = 0x09;
const CLOSING = 0x0b;
/** States in which our FIN is sent and may be unacknowledged: tx_queue then counts it as 1. */
const OUR_FIN_MAY_WAIT = new Set([FIN_WAIT1, CLOSING, LAST_ACK]);
/** States in which the peer's FIN arrived: rx_queue counts it as 1 until the app reads the EOF. */
const PEER_FIN_RECEIVED = new Set([CLOSE_WAIT, LAST_ACK, CLOSING]);

interface Row {
  state: number;
  /** write_seq - snd_una: sent or queued, not acknowledged (a sent FIN counts 1). */
  txQueue: number;
  /** rcv_nxt - copied_seq: received, not read (a received FIN counts 1 until read). */
  rxQueue: number;
}

/** The two sockets of one replayed connection, as keys of a {@link TcpQueues} table. */
export interface SocketPair {
  ours: string;
  app: string;
}

/** Keys for the connection from `ours` (our end) to `app` (the app's end). */
export function socketPair(ours: Endpoint, app: Endpoint): SocketPair {
  const a = procEndpoint(ours);
  const b = procEndpoint(app);
  return { ours: `${a}>${b}`, app: `${b}>${a}` };
}

/** One reading of the kernel's TCP tables, restricted to the sockets asked for. */
export class TcpQueues {
  readonly #rows: Map<string, Row>;

  private constructor(rows: Map<string, Row>) {
    this.#rows = rows;
  }

  /**
   * Reads the tables now, blocking: for the moment just before a reset, when no write may go
   * out between the look and the reset (the look would not see it, the reset would discard it).
   */
  static readSync(wanted: ReadonlySet<string>): TcpQueues {
    if (wanted.size === 0) return new TcpQueues(new Map());
    return new TcpQueues(
      parse(wanted, [tryReadSync('/proc/net/tcp'), tryReadSync('/proc/net/tcp6')]),
    );
  }

  static async read(wanted: ReadonlySet<string>): Promise<TcpQueues> {
    if (wanted.size === 0) return new TcpQueues(new Map());
    const texts = await Promise.all(['/proc/net/tcp', '/proc/net/tcp6'].map(tryRead));
    return new TcpQueues(parse(wanted, texts));
  }

  /**
   * Of `written` bytes written to the connection (each reported written by Node), how many the
   * app has taken for sure: read them, or closed the connection in order after they arrived.
   * Conservative: bytes in the kernel's queues that Node has not yet reported written make the
   * answer smaller, never larger. undefined when the tables no longer tell: our socket is gone
   * (reset), or the app's is gone while ours was not closed in order.
   */
  taken(pair: SocketPair, written: number): number | undefined {
    const ours = this.#rows.get(pair.ours);
    const app = this.#rows.get(pair.app);
    if (ours === undefined) {
      // The app closed first and we followed (ours is then gone at once): its TIME_WAIT says it
      // received our FIN, so every byte before it, and it had read them all when it closed
      // (bytes arriving later, or unread, would have made it reset the connection instead).
      return app?.state === TIME_WAIT ? written : undefined;
    }
    const unacked = ours.txQueue - (OUR_FIN_MAY_WAIT.has(ours.state) && ours.txQueue > 0 ? 1 : 0);
    if (app === undefined) {
      // In TIME_WAIT both FINs were exchanged and acknowledged: the app closed after every byte
      // had arrived, and with bytes unread it would have reset the connection instead. Other
      // states with the app's socket gone: it was reset, and what it held is unknown.
      return ours.state === TIME_WAIT ? Math.max(0, written - unacked) : undefined;
    }
    // The EOF is read only after every byte: a FIN still counted means data may be unread.
    const unread = app.rxQueue - (PEER_FIN_RECEIVED.has(app.state) && app.rxQueue > 0 ? 1 : 0);
    return Math.max(0, written - unacked - unread);
  }
}

function tryReadSync(path: string): string {
  try {
    return readFileSync(path, 'latin1');
  } catch {
    return ''; // no IPv6 in this kernel, or no /proc: nothing to see
  }
}

async function tryRead(path: string): Promise<string> {
  try {
    return await readFile(path, 'latin1');
  } catch {
    return '';
  }
}

/** The rows of `texts` (/proc/net/tcp{,6}) whose local>remote key is in `wanted`. */
function parse(wanted: ReadonlySet<string>, texts: string[]): Map<string, Row> {
  const rows = new Map<string, Row>();
  if (wanted.size === 0) return rows;
  for (const text of texts) {
    let start = text.indexOf('\n') + 1; // the header
    while (start > 0 && start < text.length) {
      let end = text.indexOf('\n', start);
      if (end < 0) end = text.length;
      // "  sl: LOCAL REMOTE ST TX:RX …"
      const fields = text.slice(start, end).trim().split(/\s+/, 5);
      start = end + 1;
      const [, local, remote, st, queues] = fields;
      if (local === undefined || remote === undefined || st === undefined || !queues) continue;
      const key = `${normalize(local)}>${normalize(remote)}`;
      if (!wanted.has(key)) continue;
      const state = parseInt(st, 16);
      // A 4-tuple reused while its old socket lingers in TIME_WAIT: the live one counts.
      if (state === TIME_WAIT && rows.has(key)) continue;
      const colon = queues.indexOf(':');
      rows.set(key, {
        state,
        txQueue: parseInt(queues.slice(0, colon), 16),
        rxQueue: parseInt(queues.slice(colon + 1), 16),
      });
    }
  }
  return rows;
}

const V4_MAPPED_PREFIX = '0000000000000000FFFF0000';
const LITTLE_ENDIAN = endianness() === 'LE';

/** An IPv4-mapped IPv6 address of tcp6 in the form tcp uses for the same IPv4 address. */
function normalize(procEndpoint: string): string {
  return procEndpoint.length === 37 && procEndpoint.startsWith(V4_MAPPED_PREFIX)
    ? procEndpoint.slice(24)
    : procEndpoint;
}

/**
 * An address and port as /proc/net/tcp{,6} print them: the address as 32-bit words of network
 * byte order printed as host integers (%08X each), the port in hex; IPv4-mapped IPv6 addresses in
 * their IPv4 form (see normalize).
 */
export function procEndpoint({ address, port }: Endpoint): string {
  const bytes = addressBytes(address);
  const v4 = bytes.length === 4 ? bytes : isV4Mapped(bytes) ? bytes.subarray(12) : undefined;
  const words = v4 ?? bytes;
  let hex = '';
  for (let i = 0; i < words.length; i += 4) {
    const word = LITTLE_ENDIAN ? words.readUInt32LE(i) : words.readUInt32BE(i);
    hex += word.toString(16).toUpperCase().padStart(8, '0');
  }
  return `${hex}:${port.toString(16).toUpperCase().padStart(4, '0')}`;
}

function isV4Mapped(bytes: Buffer): boolean {
  return (
    bytes.length === 16 &&
    bytes.subarray(0, 10).every((b) => b === 0) &&
    bytes[10] === 0xff &&
    bytes[11] === 0xff
  );
}

function addressBytes(address: string): Buffer {
  if (net.isIPv4(address)) return Buffer.from(address.split('.').map(Number));
  if (!net.isIPv6(address)) throw new Error(`not an IP address: ${address}`);
  let text = address.split('%')[0] ?? '';
  // A trailing dotted IPv4 part becomes two groups.
  const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (dotted) {
    const [a = 0, b = 0, c = 0, d = 0] = (dotted[1] ?? '').split('.').map(Number);
    text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const [head = '', tail] = text.split('::');
  const left = head ? head.split(':') : [];
  const right = tail ? tail.split(':') : [];
  const groups =
    tail === undefined
      ? left
      : [...left, ...Array<string>(8 - left.length - right.length).fill('0'), ...right];
  const bytes = Buffer.alloc(16);
  groups.forEach((group, i) => bytes.writeUInt16BE(parseInt(group, 16), i * 2));
  return bytes;
}
