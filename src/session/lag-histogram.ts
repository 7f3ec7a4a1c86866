/**
 * Mirror lags in log-spaced buckets (each ~4 % wider than the last, from 10 µs to over 10 min),
 * so a session at 10k requests/s can report percentiles with fixed memory and an error of a
 * few percent.
 */
const GROWTH = 1.04;
const SMALLEST_MICROS = 10;
const BUCKETS = 480;
const LOG_GROWTH = Math.log(GROWTH);

export class LagHistogram {
  readonly #counts = new Float64Array(BUCKETS);
  #total = 0;

  record(lagMicros: number): void {
    // A lag below zero is clock-sync noise: it counts as the smallest.
    const bucket =
      lagMicros <= SMALLEST_MICROS
        ? 0
        : Math.min(BUCKETS - 1, Math.ceil(Math.log(lagMicros / SMALLEST_MICROS) / LOG_GROWTH));
    this.#counts[bucket]! += 1;
    this.#total += 1;
  }

  get count(): number {
    return this.#total;
  }

  /** The lag, in milliseconds, that a fraction `q` of the recorded ones do not exceed. */
  quantileMs(q: number): number | undefined {
    if (this.#total === 0) return undefined;
    const rank = Math.max(1, Math.ceil(q * this.#total));
    let seen = 0;
    for (let bucket = 0; bucket < BUCKETS; bucket++) {
      seen += this.#counts[bucket]!;
      if (seen >= rank) return (SMALLEST_MICROS * GROWTH ** bucket) / 1000;
    }
    return (SMALLEST_MICROS * GROWTH ** (BUCKETS - 1)) / 1000;
  }

  reset(): void {
    this.#counts.fill(0);
    this.#total = 0;
  }
}
