/**
 * The agent's side of mirroring: the target's incoming TCP traffic, copied by the tap, reassembled
 * into one ordered stream per connection and sent to the session (the data path of DESIGN.md; the
 * tap, the reassembler and the outbox themselves are in src/agent/).
 */
import type { AgentSession } from '../../protocol/server.js';
import type { CloseReason, Counters } from '../../protocol/messages.js';
import { Outbox } from '../../agent/outbox.js';
import { Reassembler, type ReassemblyLimits } from '../../agent/reassembly.js';
import { Tap, TapError, type TapNetns, type TapOptions } from '../../agent/tap.js';

export interface TargetTrafficOptions {
  tap?: TapOptions;
  reassembly?: Partial<ReassemblyLimits>;
  /**
   * Bytes that may wait for the CLI before the agent drops connections rather than send more
   * (default 4 MiB): dropping whole connections, reported, keeps the others exact.
   */
  maxBacklogBytes?: number;
}

/** Session backlog above which the tap is paused until the backlog is written. */
const PAUSE_TAP_ABOVE_BYTES = 1024 * 1024;

/**
 * The target's traffic for one agent: the tap in the target's network namespace, whose ports are
 * the session's subscriptions, and the reassembled streams of their connections, sent to the
 * session. Without a session (before it arrives, after it ended) the streams' bytes are counted
 * as dropped.
 */
export class TargetTraffic {
  readonly #tap: Tap;
  readonly #reassembler: Reassembler;
  readonly #outbox: Outbox;
  #session: AgentSession | undefined;
  /** The time the reassembler is given: read once a batch, not once a segment. */
  #now = Date.now();
  /** The tap time of the segment being pushed (see onSegment). */
  #segmentTapMicros = 0;
  #tapPaused = false;

  /** Attaches the tap to every interface of the network namespace; throws a TapError. */
  constructor(netns: TapNetns, options: TargetTrafficOptions = {}) {
    this.#outbox = new Outbox(options.maxBacklogBytes ?? 4 * 1024 * 1024);
    this.#reassembler = new Reassembler(
      {
        opened: (connection) => {
          this.#session?.sendOpened({
            id: connection.id,
            family: connection.family,
            client: { address: connection.clientAddress, port: connection.clientPort },
            server: { address: connection.serverAddress, port: connection.serverPort },
            interface: this.#interfaceName(connection.ifindex),
            midStream: connection.midStream,
          });
        },
        data: (id, bytes) => {
          if (this.#session) this.#outbox.data(id, bytes, this.#segmentTapMicros);
          else this.#outbox.discard(bytes.length);
        },
        closed: (id: number, reason: CloseReason, gapBytes: number) => {
          if (this.#session) this.#outbox.closed(this.#session, id, reason, gapBytes);
        },
      },
      options.reassembly,
    );
    this.#tap = Tap.open(
      netns,
      {
        onSegment: (segment) => {
          // The reassembler delivers bytes only while it takes a segment: they are stamped with
          // that segment's time, the moment the target itself could have read them in order.
          this.#segmentTapMicros = segment.tapMicros;
          this.#reassembler.push(segment, this.#now);
        },
        onBatchEnd: () => this.#onBatchEnd(),
      },
      options.tap,
    );
  }

  /** The interfaces the tap is attached to, by name. */
  get interfaces(): string[] {
    return this.#tap.interfaces.map((i) => i.name);
  }

  get attachMode(): 'tcx' | 'tc' {
    return this.#tap.attachMode;
  }

  /**
   * Mirrors into `session` until it ends: its subscriptions become the tap's ports, and the
   * streams of their connections are sent to it.
   */
  serve(session: AgentSession): void {
    this.#session = session;
    session.on('subscribe', (port) => {
      try {
        this.#tap.subscribe(port);
      } catch (error) {
        // The tap's map could not be updated: this port is not mirrored, the others are.
        if (!(error instanceof TapError)) throw error;
        session.failSubscribe(port, error.message);
        return;
      }
      session.ackSubscribe(port);
    });
    session.on('unsubscribe', (port) => {
      try {
        this.#tap.unsubscribe(port);
      } catch (error) {
        // The port stays copied; the CLI, which no longer routes it, counts what arrives as
        // skipped.
        if (!(error instanceof TapError)) throw error;
        session.sendWarning('unsubscribe-failed', error.message);
      }
      session.ackUnsubscribe(port);
    });
    session.on('end', () => {
      this.#session = undefined;
      this.#outbox.clear();
    });
  }

  /** Once a second: ends the connections that went quiet, and tells the session the counts. */
  sweep(): void {
    this.#now = Date.now();
    this.#reassembler.sweep(this.#now);
    if (!this.#session) return;
    this.#session.sendCounters(this.counters());
    this.#session.flush();
  }

  /** Every byte the tap copied, counted once (see Counters). */
  counters(): Counters {
    const kernel = this.#tap.counters();
    const reassembler = this.#reassembler;
    const outbox = this.#outbox;
    return {
      segmentsCopied: kernel.segmentsCopied,
      bytesCopied: kernel.bytesCopied,
      segmentsDroppedKernel: kernel.segmentsDropped,
      bytesDroppedKernel: kernel.bytesDropped,
      connectionsDroppedAgent: outbox.drops.connections,
      bytesDroppedAgent: outbox.drops.bytes + reassembler.droppedBytes,
      connectionsOpen: reassembler.connectionCount,
      bytesMirrored: outbox.sentBytes,
      bytesIgnored: reassembler.ignoredBytes,
      // Counted apart from the three above: it is 0 only when every byte the kernel copied was
      // taken from the ring buffer and went somewhere (see Counters).
      bytesInAgent:
        kernel.bytesCopied -
        reassembler.pushedBytes +
        reassembler.bufferedBytes +
        outbox.pendingBytes,
    };
  }

  /**
   * Detaches the tap. What it copied before is still sent to a session that is there (the
   * target went away: the counters just sent count it).
   */
  close(): void {
    if (this.#session) this.#outbox.flush(this.#session);
    this.#tap.close();
  }

  #interfaceName(ifindex: number): string {
    return this.#tap.interfaces.find((i) => i.ifindex === ifindex)?.name ?? `if${ifindex}`;
  }

  #onBatchEnd(): void {
    this.#now = Date.now();
    const session = this.#session;
    if (!session) return;
    this.#outbox.flush(session);
    session.flush();
    // The CLI is behind: rather than drop connections, let the ring buffer (8 MiB by default)
    // absorb the burst until the session has written its backlog.
    if (session.backlogBytes > PAUSE_TAP_ABOVE_BYTES && !this.#tapPaused) {
      this.#tapPaused = true;
      this.#tap.pause();
      session.once('drain', () => {
        this.#tapPaused = false;
        this.#tap.resume();
      });
    }
  }
}
