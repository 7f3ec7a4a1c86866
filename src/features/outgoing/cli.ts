/** The CLI's side of the `outgoing` feature: connections and look-ups made by the agent. */
import type net from 'node:net';
import type { AgentClient } from '../../protocol/client.js';
import { Streams } from '../../protocol/streams.js';
import {
  OUTGOING_FEATURE,
  outgoingRequestBody,
  parseConnectionReply,
  parseResolutionReply,
  type Connection,
  type Family,
  type Resolution,
} from './messages.js';

/**
 * How long a connect may take: the target's own SYN retries give up after about 130 s (Linux's
 * default tcp_syn_retries), and that ETIMEDOUT is the answer the app must see.
 */
const CONNECT_WAIT_MS = 140_000;
/** A look-up's resolver gives up after its resolv.conf's timeouts (5 s × 2 attempts by default). */
const RESOLVE_WAIT_MS = 20_000;

/** An outgoing connection the agent opened: its stream, and where it is bound in the target. */
export type Opened = Connection & { stream: number };

/** One session's outgoing connections: each is a stream of the session (src/protocol/streams.ts). */
export class RemoteOutgoing {
  readonly #client: AgentClient;
  readonly #streams: Streams;
  #nextStream = 1;

  /** `log`: a line for the user (datagrams dropped here). */
  constructor(client: AgentClient, log: (line: string) => void) {
    this.#client = client;
    this.#streams = new Streams(client, (total) =>
      log(
        `mirrord: dropped ${total} of the app's UDP datagrams so far: the connection to the agent was behind`,
      ),
    );
    client.on('stream', (message) => this.#streams.receive(message));
    // The agent is gone: the app's connections through it are reset, never left hanging.
    client.once('end', () => this.#streams.resetAll());
  }

  /** Has the agent open a TCP connection (`udp`: a connected UDP socket) from the target. */
  async open(
    protocol: 'tcp' | 'udp',
    family: Family,
    address: string,
    port: number,
  ): Promise<Opened> {
    const stream = this.#nextStream++;
    this.#streams.expect(stream);
    try {
      const body = await this.#client.request(
        OUTGOING_FEATURE,
        outgoingRequestBody({
          op: protocol === 'tcp' ? 'connect' : 'udp',
          stream,
          family,
          address,
          port,
        }),
        CONNECT_WAIT_MS,
      );
      const connection = parseConnectionReply(body);
      if (connection.errno !== null) this.#streams.unexpect(stream);
      return { ...connection, stream };
    } catch (error) {
      this.#streams.reset(stream);
      throw error;
    }
  }

  /** Joins the app's end of an opened TCP connection. */
  join(stream: number, socket: net.Socket): void {
    this.#streams.joinSocket(stream, socket);
  }

  /** Joins the app's end of an opened UDP socket (see Streams.joinDatagrams). */
  joinDatagrams(stream: number, deliver: (bytes: Buffer) => void, close: () => void): void {
    this.#streams.joinDatagrams(stream, deliver, close);
  }

  sendDatagram(stream: number, bytes: Buffer): boolean {
    return this.#streams.sendDatagram(stream, bytes);
  }

  /** Gives up an opened stream whose app end never came, or went away. */
  abandon(stream: number): void {
    this.#streams.reset(stream);
  }

  async resolve(name: string, family: 0 | Family): Promise<Resolution> {
    const body = await this.#client.request(
      OUTGOING_FEATURE,
      outgoingRequestBody({ op: 'resolve', name, family }),
      RESOLVE_WAIT_MS,
    );
    return parseResolutionReply(body);
  }
}
