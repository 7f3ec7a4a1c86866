import type { V1Job, V1Secret, V1SecurityContext } from '@kubernetes/client-node';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot } from '../../package-root.js';
import { targetArgs } from '../../protocol/agent-launch.js';

/** The agent serves its session here inside its own pod's netns, so a fixed port never collides. */
export const AGENT_PORT = 61337;
export const AGENT_CONTAINER = 'mirrord-agent';
/**
 * Where the agent's pod mounts its Secret, and the one key of it: the session secret, which
 * the agent reads with `--secret-file` (a Job's spec is shown to anyone allowed `get jobs`, a
 * Secret's data only to those allowed `get secrets`).
 */
export const AGENT_SECRET_DIR = '/var/run/mirrord';
export const AGENT_SECRET_KEY = 'secret';
const AGENT_SECRET_VOLUME = 'mirrord-secret';

export const LABELS = {
  name: 'app.kubernetes.io/name',
  managedBy: 'app.kubernetes.io/managed-by',
  session: 'mirrord.dev/session',
} as const;
/** Selects every Job, Secret and pod this CLI made, in any session. */
export const MANAGED_SELECTOR = `${LABELS.managedBy}=mirrord`;

export const ANNOTATIONS = {
  /** What the session mirrors, for people reading `kubectl get jobs -o yaml`. */
  target: 'mirrord.dev/target',
  /** `HOST/PID` of the CLI that made the Job: `mirrord cleanup` on that host can tell it is gone. */
  cli: 'mirrord.dev/cli',
} as const;

/**
 * What the agent asks for instead of a privileged container (the README says what each is for):
 * BPF and PERFMON (load the tap and its maps; the verifier's checks for trusted programs),
 * NET_ADMIN (attach to the target's interfaces), SYS_ADMIN (enter the target's network
 * namespace), SYS_PTRACE (read other processes' /proc entries to find the target). No SYS_RESOURCE: since Linux 5.11 BPF memory is charged to the cgroup, not to
 * RLIMIT_MEMLOCK, and a node without it in its bounding set (as on these VMs) would refuse the
 * whole set.
 */
export const AGENT_CAPABILITIES = ['BPF', 'PERFMON', 'NET_ADMIN', 'SYS_ADMIN', 'SYS_PTRACE'];

/** The image pull policies Kubernetes knows: what --agent-pull-policy and mirrord.json take. */
export const PULL_POLICIES = ['Always', 'IfNotPresent', 'Never'] as const;
export type PullPolicy = (typeof PULL_POLICIES)[number];

/** The agent's settings when neither a flag nor mirrord.json gives them (help shows these). */
export const AGENT_DEFAULTS = {
  /** Seconds Kubernetes keeps the finished Job (ttlSecondsAfterFinished). */
  ttlSeconds: 60,
  /** Seconds the agent waits for its session before it exits by itself. */
  idleTimeoutSeconds: 30,
  /** Seconds the CLI waits for the agent to be ready. */
  startupTimeoutSeconds: 60,
} as const;

export interface AgentJobOptions {
  sessionId: string;
  namespace: string;
  /** The target pod's node: the agent must run there to tap it. */
  node: string;
  /** The target container's ID as the runtime reports it (`containerd://…`). */
  containerId: string;
  /** What is mirrored, as the user reads it (an annotation). */
  target: string;
  image: string;
  pullPolicy?: PullPolicy;
  pullSecrets: string[];
  /** Just the capabilities the agent needs instead of a privileged container. */
  capabilities: boolean;
  /** Seconds after the Job finished before Kubernetes deletes it (and its pod). */
  ttlSeconds: number;
  /** Seconds the agent waits for a session before it exits by itself. */
  idleTimeoutSeconds: number;
  /** Who made it, for `mirrord cleanup`. */
  cli: { host: string; pid: number };
}

export function defaultAgentImage(): string {
  const { version } = JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')) as {
    version: string;
  };
  return `ghcr.io/mirrord-dev/mirrord-agent:${version}`;
}

export function agentJobName(sessionId: string): string {
  return `mirrord-agent-${sessionId}`;
}

function sessionLabels(sessionId: string): Record<string, string> {
  return {
    [LABELS.name]: 'mirrord-agent',
    [LABELS.managedBy]: 'mirrord',
    [LABELS.session]: sessionId,
  };
}

/**
 * The agent's Job, as a pure function of the options: what `--dry-run` prints is exactly what
 * would be created.
 */
export function agentJobManifest(options: AgentJobOptions): V1Job {
  const labels = sessionLabels(options.sessionId);
  // Meshes inject a proxy into new pods unless told not to; a sidecar would keep the Job from
  // completing and sit between the port-forward and the agent. Istio and Kuma read labels or
  // annotations depending on their version, so both are set.
  const noMeshLabels = {
    'sidecar.istio.io/inject': 'false',
    'kuma.io/sidecar-injection': 'disabled',
  };
  const noMeshAnnotations = {
    'sidecar.istio.io/inject': 'false',
    'linkerd.io/inject': 'disabled',
    'kuma.io/sidecar-injection': 'disabled',
  };
  const securityContext: V1SecurityContext = options.capabilities
    ? { privileged: false, capabilities: { add: [...AGENT_CAPABILITIES] } }
    : { privileged: true };
  return {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata: {
      name: agentJobName(options.sessionId),
      namespace: options.namespace,
      labels,
      annotations: {
        [ANNOTATIONS.target]: options.target,
        [ANNOTATIONS.cli]: `${options.cli.host}/${options.cli.pid}`,
      },
    },
    spec: {
      // One attempt: a failing agent is reported to the user, not retried behind their back.
      backoffLimit: 0,
      ttlSecondsAfterFinished: options.ttlSeconds,
      template: {
        metadata: {
          labels: { ...labels, ...noMeshLabels },
          annotations: noMeshAnnotations,
        },
        spec: {
          restartPolicy: 'Never',
          // The agent finds the target's PID from its container ID in /proc/*/cgroup.
          hostPID: true,
          automountServiceAccountToken: false,
          terminationGracePeriodSeconds: 5,
          // Pinned the way the DaemonSet controller pins pods, so the scheduler still runs and
          // an agent that cannot fit on the node is reported as Unschedulable.
          affinity: {
            nodeAffinity: {
              requiredDuringSchedulingIgnoredDuringExecution: {
                nodeSelectorTerms: [
                  {
                    matchFields: [{ key: 'metadata.name', operator: 'In', values: [options.node] }],
                  },
                ],
              },
            },
          },
          // The target's node may be tainted (dedicated pools, control plane): go there anyway.
          tolerations: [{ operator: 'Exists' }],
          ...(options.pullSecrets.length > 0
            ? { imagePullSecrets: options.pullSecrets.map((name) => ({ name })) }
            : {}),
          containers: [
            {
              name: AGENT_CONTAINER,
              image: options.image,
              ...(options.pullPolicy ? { imagePullPolicy: options.pullPolicy } : {}),
              command: [
                'mirrord',
                'agent',
                ...targetArgs({ containerId: options.containerId }),
                '--listen',
                `127.0.0.1:${AGENT_PORT}`,
                '--idle-timeout',
                String(options.idleTimeoutSeconds),
                '--secret-file',
                `${AGENT_SECRET_DIR}/${AGENT_SECRET_KEY}`,
              ],
              securityContext,
              volumeMounts: [
                { name: AGENT_SECRET_VOLUME, mountPath: AGENT_SECRET_DIR, readOnly: true },
              ],
              resources: {
                requests: { cpu: '50m', memory: '64Mi' },
                limits: { memory: '256Mi' },
              },
            },
          ],
          // The Secret is created right after the Job (it names the Job's uid as its owner); the
          // kubelet does not start the pod before a volume's Secret exists.
          volumes: [
            {
              name: AGENT_SECRET_VOLUME,
              secret: {
                secretName: agentJobName(options.sessionId),
                items: [{ key: AGENT_SECRET_KEY, path: AGENT_SECRET_KEY }],
                // The agent runs as root and only reads it: nobody else needs it.
                defaultMode: 0o400,
              },
            },
          ],
        },
      },
    },
  };
}

/**
 * The Secret that hands the agent its session secret, named and labelled like its Job. With
 * `created` (the Job's uid once the API server made it, and the secret): owned by the Job, so
 * the garbage collector deletes it with the Job however the Job goes (the CLI's deletion, the
 * TTL, `mirrord cleanup`, kubectl). Without: what `--dry-run` prints, which has neither, since
 * neither exists before a start (see agentJobYaml).
 */
export function agentSecretManifest(
  job: V1Job,
  created?: { jobUid: string; secret: string },
): V1Secret {
  const name = job.metadata?.name ?? '';
  return {
    apiVersion: 'v1',
    kind: 'Secret',
    metadata: {
      name,
      namespace: job.metadata?.namespace ?? '',
      labels: { ...job.metadata?.labels },
      // No blockOwnerDeletion: where the OwnerReferencesPermissionEnforcement admission plugin
      // runs (OpenShift), setting it needs `update jobs/finalizers` too, and the garbage
      // collector deletes the Secret with the Job without it.
      ...(created
        ? {
            ownerReferences: [{ apiVersion: 'batch/v1', kind: 'Job', name, uid: created.jobUid }],
          }
        : {}),
    },
    type: 'Opaque',
    // Nobody changes the session secret after the start: the API server refuses updates.
    immutable: true,
    ...(created
      ? { data: { [AGENT_SECRET_KEY]: Buffer.from(created.secret).toString('base64') } }
      : {}),
  };
}
