/**
 * The clock both ends stamp messages with: CLOCK_MONOTONIC in microseconds, the clock of the
 * tap's `bpf_ktime_get_ns()` and of Node's `process.hrtime`. Microseconds, not nanoseconds, so
 * that a node up for years still fits a double exactly.
 */
export function monotonicMicros(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

/** Accepted samples are renewed at least this often: two machines' clocks drift apart. */
const RENEW_AFTER_MICROS = 60_000_000;

/**
 * Pings the client sends right after the handshake, this far apart, before it settles on the
 * keep-alive interval. The hello's round trip is a poor sample: on a fresh port-forward the
 * first frames take a slow path (tens of ms, mostly one way), which skews the offset by up to
 * half of it, and the next keep-alive ping is seconds away. A few quick samples, of which
 * AgentClock keeps those with the shortest round trips, fix the offset within half a second.
 */
export const STARTUP_CLOCK_SAMPLES = 5;
export const STARTUP_CLOCK_SAMPLE_INTERVAL_MS = 100;

/**
 * Maps the agent's clock onto ours, from samples of (when we asked, the agent's clock in its
 * answer, when the answer arrived), as NTP does: the agent read its clock about midway through
 * the round trip, so the error of a sample is at most half its round trip, and the samples
 * with the shortest round trips are kept. On one machine the offset is about zero.
 */
export class AgentClock {
  #offsetMicros = 0;
  #bestRoundTripMicros = Infinity;
  #acceptedAtMicros = -Infinity;

  sample(askedMicros: number, agentMicros: number, answeredMicros: number): void {
    const roundTrip = answeredMicros - askedMicros;
    const stale = answeredMicros - this.#acceptedAtMicros > RENEW_AFTER_MICROS;
    // 100 µs of slack: on loopback round trips differ by more than that between samples.
    if (!stale && roundTrip > this.#bestRoundTripMicros * 1.5 + 100) return;
    this.#offsetMicros = agentMicros - (askedMicros + answeredMicros) / 2;
    this.#bestRoundTripMicros = stale ? roundTrip : Math.min(roundTrip, this.#bestRoundTripMicros);
    this.#acceptedAtMicros = answeredMicros;
  }

  /** A time on the agent's clock, on ours. */
  toLocal(agentMicros: number): number {
    return agentMicros - this.#offsetMicros;
  }
}
