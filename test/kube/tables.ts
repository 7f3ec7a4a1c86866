import type { Job, KubeObject, Pod, ResourceName, Workload } from './types.js';

/**
 * Server-side printing: the `Table` kubectl asks for (`Accept: …;as=Table;g=meta.k8s.io`), with
 * the columns `kubectl get` shows for the resources served, so that `npm run dev:cluster` can be
 * looked at with kubectl as a real cluster would be.
 */

interface Column {
  name: string;
  type: string;
  format?: string;
  priority?: number;
  cell: (object: KubeObject) => string | number;
}

function age(object: KubeObject): string {
  const seconds = Math.max(
    0,
    Math.floor((Date.now() - Date.parse(object.metadata.creationTimestamp ?? '')) / 1000),
  );
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 2 * 3600) return `${Math.floor(seconds / 60)}m`;
  return `${Math.floor(seconds / 3600)}h`;
}

function podStatus(pod: Pod): string {
  if (pod.metadata.deletionTimestamp) return 'Terminating';
  for (const status of pod.status.containerStatuses ?? []) {
    const reason = status.state.waiting?.reason ?? status.state.terminated?.reason;
    if (reason && reason !== 'Completed') return reason;
  }
  return pod.status.phase === 'Succeeded' ? 'Completed' : pod.status.phase;
}

function jobStatus(job: Job): string {
  const finished = (job.status.conditions ?? []).find(
    (c) => (c.type === 'Complete' || c.type === 'Failed') && c.status === 'True',
  );
  return finished?.type ?? 'Running';
}

const name: Column = {
  name: 'Name',
  type: 'string',
  format: 'name',
  cell: (o) => o.metadata.name ?? '',
};
const ageColumn: Column = { name: 'Age', type: 'string', cell: age };

const COLUMNS: Partial<Record<ResourceName, Column[]>> = {
  pods: [
    name,
    {
      name: 'Ready',
      type: 'string',
      cell: (o) => {
        const statuses = (o as Pod).status.containerStatuses ?? [];
        return `${statuses.filter((s) => s.ready).length}/${(o as Pod).spec.containers.length}`;
      },
    },
    { name: 'Status', type: 'string', cell: (o) => podStatus(o as Pod) },
    {
      name: 'Restarts',
      type: 'integer',
      cell: (o) =>
        ((o as Pod).status.containerStatuses ?? []).reduce((sum, s) => sum + s.restartCount, 0),
    },
    ageColumn,
    { name: 'IP', type: 'string', priority: 1, cell: (o) => (o as Pod).status.podIP ?? '<none>' },
    {
      name: 'Node',
      type: 'string',
      priority: 1,
      cell: (o) => (o as Pod).spec.nodeName ?? '<none>',
    },
  ],
  jobs: [
    name,
    { name: 'Status', type: 'string', cell: (o) => jobStatus(o as Job) },
    {
      name: 'Completions',
      type: 'string',
      cell: (o) => `${(o as Job).status.succeeded ?? 0}/${(o as Job).spec.completions ?? 1}`,
    },
    ageColumn,
  ],
  deployments: [
    name,
    {
      name: 'Ready',
      type: 'string',
      cell: (o) => `${(o as Workload).status.readyReplicas ?? 0}/${(o as Workload).spec.replicas}`,
    },
    {
      name: 'Available',
      type: 'integer',
      cell: (o) => (o as Workload).status.availableReplicas ?? 0,
    },
    ageColumn,
  ],
  replicasets: [
    name,
    { name: 'Desired', type: 'integer', cell: (o) => (o as Workload).spec.replicas },
    { name: 'Current', type: 'integer', cell: (o) => (o as Workload).status.replicas ?? 0 },
    { name: 'Ready', type: 'integer', cell: (o) => (o as Workload).status.readyReplicas ?? 0 },
    ageColumn,
  ],
  statefulsets: [
    name,
    {
      name: 'Ready',
      type: 'string',
      cell: (o) => `${(o as Workload).status.readyReplicas ?? 0}/${(o as Workload).spec.replicas}`,
    },
    ageColumn,
  ],
};

export function wantsTable(accept: string | undefined): boolean {
  return /as=Table/.test(accept ?? '');
}

export function toTable(
  resource: ResourceName,
  objects: KubeObject[],
  resourceVersion: string,
): object {
  const columns = COLUMNS[resource] ?? [name, ageColumn];
  return {
    kind: 'Table',
    apiVersion: 'meta.k8s.io/v1',
    metadata: { resourceVersion },
    columnDefinitions: columns.map((c) => ({
      name: c.name,
      type: c.type,
      format: c.format ?? '',
      description: '',
      priority: c.priority ?? 0,
    })),
    rows: objects.map((object) => ({ cells: columns.map((c) => c.cell(object)), object })),
  };
}
