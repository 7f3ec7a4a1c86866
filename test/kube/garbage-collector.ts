import { successStatus } from './errors.js';
import type { ObjectStore } from './store.js';
import { RESOURCES, timestamp, type KubeObject, type Pod, type ResourceName } from './types.js';

/**
 * Deletion as the API server and the garbage collector carry it out:
 * - pods on the node are deleted gracefully (deletionTimestamp set; the kubelet stops the
 *   containers, SIGTERM then SIGKILL after the grace period, and then removes the object);
 *   pods that never ran or already finished, and grace period 0, go at once;
 * - other objects follow the propagation policy over ownerReferences: Background (the owner
 *   goes at once, its dependents right after), Foreground (the owner stays, with
 *   deletionTimestamp and the foregroundDeletion finalizer, until its dependents are gone),
 *   Orphan (dependents lose their ownerReference and stay). As in the real batch/v1 API, a Job
 *   deleted without a policy orphans its pods, with the real API server's warning.
 */

export type PropagationPolicy = 'Background' | 'Foreground' | 'Orphan';

export interface DeleteOptions {
  propagationPolicy?: PropagationPolicy;
  gracePeriodSeconds?: number;
}

export interface DeleteResult {
  body: object;
  /** A `Warning` header for the client (299), as the real API server sends it. */
  warning?: string;
}

const JOB_ORPHAN_WARNING =
  'child pods are preserved by default when jobs are deleted; set propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress this warning';

export class GarbageCollector {
  /** Owners deleted in the foreground, by uid, waiting for their dependents to go. */
  readonly #waiting = new Map<string, { resource: ResourceName; object: KubeObject }>();
  readonly #unsubscribe: () => void;
  #closed = false;

  constructor(private readonly store: ObjectStore) {
    this.#unsubscribe = store.subscribe((event) => {
      if (event.type === 'DELETED') this.#finishForeground();
    });
  }

  close(): void {
    this.#closed = true;
    this.#unsubscribe();
  }

  /** Deletes an object as a DELETE request asks; throws NotFound. */
  delete(
    resource: ResourceName,
    namespace: string | undefined,
    name: string,
    options: DeleteOptions = {},
  ): DeleteResult {
    const object = this.store.mustGet(resource, namespace, name);
    if (resource === 'pods') return { body: this.#deletePod(object as Pod, options) };
    const explicit = options.propagationPolicy;
    const policy = explicit ?? (resource === 'jobs' ? 'Orphan' : 'Background');
    const warning = resource === 'jobs' && !explicit ? JOB_ORPHAN_WARNING : undefined;
    const uid = object.metadata.uid ?? '';
    if (object.metadata.deletionTimestamp) return { body: object, ...(warning ? { warning } : {}) };
    let body: object = successStatus(RESOURCES[resource], name, uid);
    switch (policy) {
      case 'Orphan':
        for (const dependent of this.store.dependentsOf(uid)) {
          this.store.update(
            dependent.resource,
            dependent.object.metadata.namespace,
            dependent.object.metadata.name ?? '',
            (o) => {
              o.metadata.ownerReferences = o.metadata.ownerReferences?.filter(
                (ref) => ref.uid !== uid,
              );
              if (o.metadata.ownerReferences?.length === 0) delete o.metadata.ownerReferences;
            },
          );
        }
        this.store.remove(resource, namespace, name);
        break;
      case 'Background':
        this.store.remove(resource, namespace, name);
        // The collector notices the owner is gone shortly after, never in the same request.
        setImmediate(() => this.#deleteDependents(uid, 'Background'));
        break;
      case 'Foreground':
        body =
          this.store.update(resource, namespace, name, (o) => {
            o.metadata.deletionTimestamp = timestamp();
            o.metadata.deletionGracePeriodSeconds = 0;
            o.metadata.finalizers = [...(o.metadata.finalizers ?? []), 'foregroundDeletion'];
          }) ?? body;
        this.#waiting.set(uid, { resource, object });
        this.#deleteDependents(uid, 'Foreground');
        this.#finishForeground();
        break;
    }
    return { body, ...(warning ? { warning } : {}) };
  }

  #deletePod(pod: Pod, options: DeleteOptions): object {
    const namespace = pod.metadata.namespace;
    const name = pod.metadata.name ?? '';
    const grace = options.gracePeriodSeconds ?? pod.spec.terminationGracePeriodSeconds ?? 30;
    const finished = pod.status.phase === 'Succeeded' || pod.status.phase === 'Failed';
    if (!pod.spec.nodeName || finished || grace === 0) {
      return this.store.remove('pods', namespace, name) ?? pod;
    }
    const current = pod.metadata.deletionGracePeriodSeconds;
    if (pod.metadata.deletionTimestamp && current !== undefined && current <= grace) return pod;
    return (
      this.store.update<Pod>('pods', namespace, name, (p) => {
        p.metadata.deletionTimestamp = timestamp(new Date(Date.now() + grace * 1000));
        p.metadata.deletionGracePeriodSeconds = grace;
      }) ?? pod
    );
  }

  #deleteDependents(uid: string, policy: PropagationPolicy): void {
    if (this.#closed) return;
    for (const dependent of this.store.dependentsOf(uid)) {
      try {
        this.delete(
          dependent.resource,
          dependent.object.metadata.namespace,
          dependent.object.metadata.name ?? '',
          { propagationPolicy: policy },
        );
      } catch {
        // Gone meanwhile.
      }
    }
  }

  #finishForeground(): void {
    for (const [uid, owner] of this.#waiting) {
      if (this.store.dependentsOf(uid).length > 0) continue;
      this.#waiting.delete(uid);
      this.store.remove(
        owner.resource,
        owner.object.metadata.namespace,
        owner.object.metadata.name ?? '',
      );
    }
  }
}
