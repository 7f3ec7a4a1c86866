import type { GarbageCollector } from './garbage-collector.js';
import { newPodFromTemplate } from './admission.js';
import type { ObjectStore, StoreEvent } from './store.js';
import {
  setCondition,
  timestamp,
  type Condition,
  type Job,
  type KubeObject,
  type Pod,
} from './types.js';

/**
 * The Job controller, for the non-indexed Jobs with one completion that mirrord creates: one
 * pod at a time from the template (labels job-name, batch.kubernetes.io/job-name,
 * controller-uid and batch.kubernetes.io/controller-uid, an ownerReference to the Job); a pod
 * that succeeds completes the Job (condition Complete), pods that fail or vanish before
 * finishing count as failures, and more failures than backoffLimit fail it (condition Failed,
 * reason BackoffLimitExceeded; with backoffLimit 0 the first failure does). activeDeadlineSeconds
 * fails it with DeadlineExceeded. The pods of a finished Job that still run are deleted.
 */

function isFinished(job: Job): boolean {
  return (job.status.conditions ?? []).some(
    (c) => (c.type === 'Complete' || c.type === 'Failed') && c.status === 'True',
  );
}

function controllerUid(object: KubeObject): string | undefined {
  return object.metadata.ownerReferences?.find((ref) => ref.controller && ref.kind === 'Job')?.uid;
}

function isReady(pod: Pod): boolean {
  return (pod.status.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
}

export class JobController {
  readonly #unsubscribe: () => void;
  readonly #deadlines = new Map<string, NodeJS.Timeout>();
  /** Pods of each Job (by uid) that vanished before they finished: failures. */
  readonly #lost = new Map<string, Set<string>>();

  constructor(
    private readonly store: ObjectStore,
    private readonly collector: GarbageCollector,
  ) {
    this.#unsubscribe = store.subscribe((event) => this.#onEvent(event));
  }

  close(): void {
    this.#unsubscribe();
    for (const timer of this.#deadlines.values()) clearTimeout(timer);
    this.#deadlines.clear();
  }

  #onEvent(event: StoreEvent): void {
    if (event.resource === 'jobs') {
      const uid = event.object.metadata.uid ?? '';
      if (event.type === 'DELETED') {
        clearTimeout(this.#deadlines.get(uid));
        this.#deadlines.delete(uid);
        this.#lost.delete(uid);
        return;
      }
      this.#sync(event.object as Job);
      return;
    }
    if (event.resource !== 'pods') return;
    const ownerUid = controllerUid(event.object);
    if (!ownerUid) return;
    const pod = event.object as Pod;
    if (
      event.type === 'DELETED' &&
      pod.status.phase !== 'Succeeded' &&
      pod.status.phase !== 'Failed'
    ) {
      const lost = this.#lost.get(ownerUid) ?? new Set<string>();
      lost.add(pod.metadata.uid ?? '');
      this.#lost.set(ownerUid, lost);
    }
    const owner = this.store
      .list<Job>('jobs', pod.metadata.namespace)
      .find((job) => job.metadata.uid === ownerUid);
    if (owner) this.#sync(owner);
  }

  #sync(job: Job): void {
    if (job.metadata.deletionTimestamp || isFinished(job)) return;
    const namespace = job.metadata.namespace;
    const name = job.metadata.name ?? '';
    const uid = job.metadata.uid ?? '';
    const pods = this.store.list<Pod>('pods', namespace).filter((p) => controllerUid(p) === uid);
    const active = pods.filter(
      (p) =>
        !p.metadata.deletionTimestamp &&
        p.status.phase !== 'Succeeded' &&
        p.status.phase !== 'Failed',
    );
    const succeeded = pods.filter((p) => p.status.phase === 'Succeeded').length;
    const failed =
      pods.filter((p) => p.status.phase === 'Failed').length + (this.#lost.get(uid)?.size ?? 0);
    const terminating = pods.filter(
      (p) =>
        p.metadata.deletionTimestamp &&
        p.status.phase !== 'Succeeded' &&
        p.status.phase !== 'Failed',
    ).length;

    let finish: Omit<Condition, 'lastTransitionTime'> | undefined;
    if (succeeded >= (job.spec.completions ?? 1)) {
      finish = { type: 'Complete', status: 'True' };
    } else if (failed > (job.spec.backoffLimit ?? 6)) {
      finish = {
        type: 'Failed',
        status: 'True',
        reason: 'BackoffLimitExceeded',
        message: 'Job has reached the specified backoff limit',
      };
    } else if (active.length === 0 && terminating === 0) {
      this.store.create('pods', newPodFromTemplate(job));
      this.#armDeadline(job);
      return; // the new pod's ADDED event syncs the Job again
    }
    if (finish) {
      this.#finish(job, finish, active);
      return;
    }
    this.store.update<Job>('jobs', namespace, name, (j) => {
      j.status.startTime ??= timestamp();
      j.status.active = active.length;
      j.status.ready = active.filter(isReady).length;
      j.status.terminating = terminating;
      if (failed) j.status.failed = failed;
      else delete j.status.failed;
    });
    this.#armDeadline(job);
  }

  #finish(job: Job, condition: Omit<Condition, 'lastTransitionTime'>, active: Pod[]): void {
    clearTimeout(this.#deadlines.get(job.metadata.uid ?? ''));
    this.store.update<Job>('jobs', job.metadata.namespace, job.metadata.name ?? '', (j) => {
      let conditions = j.status.conditions ?? [];
      if (condition.type === 'Failed') {
        conditions = setCondition(conditions, { ...condition, type: 'FailureTarget' });
      } else {
        conditions = setCondition(conditions, { ...condition, type: 'SuccessCriteriaMet' });
      }
      j.status.conditions = setCondition(conditions, condition);
      j.status.active = 0;
      j.status.ready = 0;
      const pods = this.store
        .list<Pod>('pods', job.metadata.namespace)
        .filter((p) => controllerUid(p) === job.metadata.uid);
      const succeeded = pods.filter((p) => p.status.phase === 'Succeeded').length;
      const failed =
        pods.filter((p) => p.status.phase === 'Failed').length +
        (this.#lost.get(job.metadata.uid ?? '')?.size ?? 0);
      if (succeeded) j.status.succeeded = succeeded;
      if (failed) j.status.failed = failed;
      if (condition.type === 'Complete') j.status.completionTime = timestamp();
    });
    for (const pod of active) {
      try {
        this.collector.delete('pods', pod.metadata.namespace, pod.metadata.name ?? '');
      } catch {
        // Gone meanwhile.
      }
    }
  }

  #armDeadline(job: Job): void {
    const uid = job.metadata.uid ?? '';
    const deadline = job.spec.activeDeadlineSeconds;
    if (deadline === undefined || this.#deadlines.has(uid)) return;
    const started = Date.parse(job.status.startTime ?? '') || Date.now();
    const timer = setTimeout(
      () => {
        const current = this.store.get<Job>(
          'jobs',
          job.metadata.namespace,
          job.metadata.name ?? '',
        );
        if (!current || current.metadata.uid !== uid || isFinished(current)) return;
        const active = this.store
          .list<Pod>('pods', job.metadata.namespace)
          .filter((p) => controllerUid(p) === uid && !p.metadata.deletionTimestamp);
        this.#finish(
          current,
          {
            type: 'Failed',
            status: 'True',
            reason: 'DeadlineExceeded',
            message: 'Job was active longer than specified deadline',
          },
          active,
        );
      },
      Math.max(0, started + deadline * 1000 - Date.now()),
    );
    this.#deadlines.set(uid, timer);
  }
}
