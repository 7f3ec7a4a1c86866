import { createHash } from 'node:crypto';
import { podFromTemplate } from './admission.js';
import type { ObjectStore, StoreEvent } from './store.js';
import {
  setCondition,
  type KubeObject,
  type Pod,
  type ResourceName,
  type Workload,
  type WorkloadStatus,
} from './types.js';

/**
 * The ReplicaSet, StatefulSet and Deployment controllers, as far as targets need them: keep
 * `replicas` pods (a deleted pod is replaced at once, as upstream: the replacement starts
 * while the old one terminates), name them as upstream does (`<replicaset>-<5 chars>` with
 * the pod-template-hash label; `<statefulset>-<ordinal>`, created in parallel), and report
 * replicas / readyReplicas / availableReplicas up to the Deployment.
 */

/** The hash upstream puts in pod-template-hash and controller-revision-hash, made stable. */
export function templateHash(template: unknown): string {
  return createHash('sha256').update(JSON.stringify(template)).digest('hex').slice(0, 10);
}

function controllerOf(object: KubeObject): { kind: string; uid: string } | undefined {
  const ref = object.metadata.ownerReferences?.find((r) => r.controller);
  return ref ? { kind: ref.kind, uid: ref.uid } : undefined;
}

function isReady(pod: Pod): boolean {
  return (pod.status.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
}

function isLive(pod: Pod): boolean {
  return (
    !pod.metadata.deletionTimestamp &&
    pod.status.phase !== 'Succeeded' &&
    pod.status.phase !== 'Failed'
  );
}

export class WorkloadControllers {
  readonly #unsubscribe: () => void;

  constructor(private readonly store: ObjectStore) {
    this.#unsubscribe = store.subscribe((event) => this.#onEvent(event));
  }

  close(): void {
    this.#unsubscribe();
  }

  #onEvent(event: StoreEvent): void {
    const { resource, object } = event;
    if (event.type !== 'DELETED' && (resource === 'replicasets' || resource === 'statefulsets')) {
      this.#sync(resource, object as Workload);
    }
    if (resource !== 'pods' && resource !== 'replicasets') return;
    const owner = controllerOf(object);
    if (!owner) return;
    const ownerResource: ResourceName | undefined =
      owner.kind === 'ReplicaSet'
        ? 'replicasets'
        : owner.kind === 'StatefulSet'
          ? 'statefulsets'
          : owner.kind === 'Deployment'
            ? 'deployments'
            : undefined;
    if (!ownerResource) return;
    const workload = this.#byUid(ownerResource, object.metadata.namespace, owner.uid);
    if (!workload) return;
    if (ownerResource === 'deployments') this.#syncDeployment(workload);
    else this.#sync(ownerResource, workload);
  }

  #byUid(resource: ResourceName, namespace: string | undefined, uid: string): Workload | undefined {
    return this.store.list<Workload>(resource, namespace).find((w) => w.metadata.uid === uid);
  }

  #owned<T extends KubeObject>(resource: ResourceName, owner: Workload): T[] {
    return this.store
      .list<T>(resource, owner.metadata.namespace)
      .filter((o) => controllerOf(o)?.uid === owner.metadata.uid);
  }

  #sync(resource: 'replicasets' | 'statefulsets', workload: Workload): void {
    if (workload.metadata.deletionTimestamp) return;
    const name = workload.metadata.name ?? '';
    const pods = this.#owned<Pod>('pods', workload);
    const hash = templateHash(workload.spec.template);
    if (resource === 'replicasets') {
      const missing = workload.spec.replicas - pods.filter(isLive).length;
      for (let i = 0; i < missing; i += 1) {
        this.store.create(
          'pods',
          podFromTemplate(workload, workload.spec.template, { generateName: `${name}-` }),
        );
      }
    } else {
      for (let ordinal = 0; ordinal < workload.spec.replicas; ordinal += 1) {
        const podName = `${name}-${ordinal}`;
        if (this.store.get('pods', workload.metadata.namespace, podName)) continue;
        const pod = podFromTemplate(
          workload,
          workload.spec.template,
          { name: podName },
          {
            'apps.kubernetes.io/pod-index': String(ordinal),
            'controller-revision-hash': `${name}-${hash}`,
            'statefulset.kubernetes.io/pod-name': podName,
          },
        );
        pod.spec.hostname = podName;
        if (workload.spec.serviceName) pod.spec.subdomain = workload.spec.serviceName;
        this.store.create('pods', pod);
      }
    }
    const live = this.#owned<Pod>('pods', workload).filter(isLive);
    const ready = live.filter(isReady).length;
    this.store.update<Workload>(resource, workload.metadata.namespace, name, (w) => {
      const status: WorkloadStatus = {
        ...w.status,
        replicas: live.length,
        readyReplicas: ready,
        availableReplicas: ready,
        observedGeneration: w.metadata.generation ?? 1,
      };
      if (resource === 'statefulsets') {
        status.currentReplicas = live.length;
        status.updatedReplicas = live.length;
      }
      w.status = status;
    });
  }

  #syncDeployment(deployment: Workload): void {
    const replicaSets = this.#owned<Workload>('replicasets', deployment);
    const replicas = replicaSets.reduce((sum, rs) => sum + (rs.status.replicas ?? 0), 0);
    const ready = replicaSets.reduce((sum, rs) => sum + (rs.status.readyReplicas ?? 0), 0);
    this.store.update<Workload>(
      'deployments',
      deployment.metadata.namespace,
      deployment.metadata.name ?? '',
      (d) => {
        const available = ready >= d.spec.replicas;
        let conditions = setCondition(d.status.conditions ?? [], {
          type: 'Available',
          status: available ? 'True' : 'False',
          reason: available ? 'MinimumReplicasAvailable' : 'MinimumReplicasUnavailable',
          message: available
            ? 'Deployment has minimum availability.'
            : 'Deployment does not have minimum availability.',
        });
        conditions = setCondition(conditions, {
          type: 'Progressing',
          status: 'True',
          reason: 'NewReplicaSetAvailable',
          message: `ReplicaSet "${replicaSets[0]?.metadata.name ?? ''}" has successfully progressed.`,
        });
        d.status = {
          ...d.status,
          observedGeneration: d.metadata.generation ?? 1,
          replicas,
          updatedReplicas: replicas,
          readyReplicas: ready,
          availableReplicas: ready,
          conditions,
        };
      },
    );
  }
}
