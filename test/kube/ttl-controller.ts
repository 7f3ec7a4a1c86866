import type { GarbageCollector } from './garbage-collector.js';
import type { ObjectStore, StoreEvent } from './store.js';
import type { Job } from './types.js';

/**
 * The TTL-after-finished controller: a finished Job (Complete or Failed) with
 * ttlSecondsAfterFinished is deleted, with its pods (Background), that many seconds after it
 * finished. `ttlScale` shortens the wait for tests (0.01: a 60 s TTL takes 0.6 s).
 */
export class TtlController {
  readonly #timers = new Map<string, NodeJS.Timeout>();
  readonly #unsubscribe: () => void;

  constructor(
    private readonly store: ObjectStore,
    private readonly collector: GarbageCollector,
    private readonly ttlScale: number,
  ) {
    this.#unsubscribe = store.subscribe((event) => this.#onEvent(event));
  }

  close(): void {
    this.#unsubscribe();
    for (const timer of this.#timers.values()) clearTimeout(timer);
    this.#timers.clear();
  }

  #onEvent(event: StoreEvent): void {
    if (event.resource !== 'jobs') return;
    const job = event.object as Job;
    const uid = job.metadata.uid ?? '';
    if (event.type === 'DELETED') {
      clearTimeout(this.#timers.get(uid));
      this.#timers.delete(uid);
      return;
    }
    const ttl = job.spec.ttlSecondsAfterFinished;
    const finished = (job.status.conditions ?? []).find(
      (c) => (c.type === 'Complete' || c.type === 'Failed') && c.status === 'True',
    );
    if (ttl === undefined || !finished || this.#timers.has(uid) || job.metadata.deletionTimestamp) {
      return;
    }
    // Timed from now rather than from the condition's time, which has whole seconds only: the
    // controller sees the Job finish the moment it does.
    const delay = ttl * 1000 * this.ttlScale;
    this.#timers.set(
      uid,
      setTimeout(() => {
        this.#timers.delete(uid);
        const current = this.store.get<Job>(
          'jobs',
          job.metadata.namespace,
          job.metadata.name ?? '',
        );
        if (current?.metadata.uid !== uid) return;
        this.collector.delete('jobs', job.metadata.namespace, job.metadata.name ?? '', {
          propagationPolicy: 'Background',
        });
      }, delay),
    );
  }
}
