/**
 * The agent's Job: every field the issue asks for, as a pure function of the options, and as
 * `mirrord mirror --dry-run` prints it (valid YAML of a Job, and nothing created).
 */
import { loadYaml, type V1Job } from '@kubernetes/client-node';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  AGENT_CAPABILITIES,
  AGENT_PORT,
  agentJobManifest,
  type AgentJobOptions,
} from '../src/platform/kube/agent-job.js';
import { startStandInCluster, type PodHandle, type StandInCluster } from './kube/cluster.js';
import { tempDir } from './support/mirror-cli.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'bin', 'run.js');
const VERSION = (
  JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }
).version;

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[], cwd?: string): Promise<CliResult> {
  const child = spawn(process.execPath, [CLI, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd,
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}

/** Every field of the list, checked against the options the Job was made from. */
function expectAgentJob(job: V1Job, options: AgentJobOptions): void {
  const sessionLabels = {
    'app.kubernetes.io/name': 'mirrord-agent',
    'app.kubernetes.io/managed-by': 'mirrord',
    'mirrord.dev/session': options.sessionId,
  };
  expect(job.apiVersion).toBe('batch/v1');
  expect(job.kind).toBe('Job');
  expect(job.metadata?.name).toBe(`mirrord-agent-${options.sessionId}`);
  expect(job.metadata?.namespace).toBe(options.namespace);
  expect(job.metadata?.labels).toEqual(sessionLabels);
  expect(job.metadata?.annotations).toEqual({
    'mirrord.dev/target': options.target,
    'mirrord.dev/cli': `${options.cli.host}/${options.cli.pid}`,
  });
  expect(job.spec?.backoffLimit).toBe(0);
  expect(job.spec?.ttlSecondsAfterFinished).toBe(options.ttlSeconds);

  const template = job.spec!.template;
  // Labels that identify mirrord and the session, and mesh injection disabled for Istio,
  // Linkerd and Kuma (labels and annotations).
  expect(template.metadata?.labels).toEqual({
    ...sessionLabels,
    'sidecar.istio.io/inject': 'false',
    'kuma.io/sidecar-injection': 'disabled',
  });
  expect(template.metadata?.annotations).toEqual({
    'sidecar.istio.io/inject': 'false',
    'linkerd.io/inject': 'disabled',
    'kuma.io/sidecar-injection': 'disabled',
  });
  const pod = template.spec!;
  expect(pod.restartPolicy).toBe('Never');
  expect(pod.hostPID).toBe(true);
  // Pinned to the target pod's node the way DaemonSets are.
  expect(pod.affinity?.nodeAffinity?.requiredDuringSchedulingIgnoredDuringExecution).toEqual({
    nodeSelectorTerms: [
      { matchFields: [{ key: 'metadata.name', operator: 'In', values: [options.node] }] },
    ],
  });
  // Tolerates every taint.
  expect(pod.tolerations).toEqual([{ operator: 'Exists' }]);
  expect(pod.imagePullSecrets ?? []).toEqual(options.pullSecrets.map((name) => ({ name })));
  expect(pod.containers).toHaveLength(1);
  const [container] = pod.containers;
  expect(container!.image).toBe(options.image);
  expect(container!.imagePullPolicy).toBe(options.pullPolicy);
  // The agent gets the target's container ID and finds its PID itself.
  expect(container!.command).toEqual([
    'mirrord',
    'agent',
    '--container-id',
    options.containerId,
    '--listen',
    `127.0.0.1:${AGENT_PORT}`,
    '--idle-timeout',
    String(options.idleTimeoutSeconds),
  ]);
  if (options.capabilities) {
    expect(container!.securityContext?.privileged).toBe(false);
    expect(container!.securityContext?.capabilities?.add).toEqual(AGENT_CAPABILITIES);
  } else {
    expect(container!.securityContext).toEqual({ privileged: true });
  }
  // Small resource requests.
  expect(container!.resources).toEqual({
    requests: { cpu: '50m', memory: '64Mi' },
    limits: { memory: '256Mi' },
  });
}

const OPTIONS: AgentJobOptions = {
  sessionId: '0a1b2c3d',
  namespace: 'team-a',
  node: 'worker-7',
  containerId: `containerd://${'4f'.repeat(32)}`,
  target: 'pod team-a/api-7f9 (container api)',
  image: 'registry.example/team/mirrord-agent:1.2.3',
  pullPolicy: 'IfNotPresent',
  pullSecrets: ['regcred', 'mirror-pull'],
  capabilities: false,
  ttlSeconds: 45,
  idleTimeoutSeconds: 12,
  cli: { host: 'laptop', pid: 4242 },
};

describe('the agent Job manifest', () => {
  test('has every field the issue lists, privileged by default', () => {
    expectAgentJob(agentJobManifest(OPTIONS), OPTIONS);
  });

  test('with --agent-capabilities: just the capabilities the agent needs, not privileged', () => {
    const options = { ...OPTIONS, capabilities: true, pullSecrets: [], pullPolicy: undefined };
    const job = agentJobManifest(options);
    expectAgentJob(job, options);
    expect(job.spec?.template.spec?.imagePullSecrets).toBeUndefined();
    expect(job.spec?.template.spec?.containers[0]?.imagePullPolicy).toBeUndefined();
  });
});

describe('mirrord mirror --dry-run', () => {
  let cluster: StandInCluster;
  let target: PodHandle;
  let dir: ReturnType<typeof tempDir>;

  beforeAll(async () => {
    cluster = await startStandInCluster();
    dir = tempDir('kube-job');
    // A mesh sidecar first: the default container must be the app behind it.
    target = await cluster.addPod({
      name: 'api',
      containers: [
        { name: 'istio-proxy', image: 'stand-in/local', command: ['sleep', '3600'] },
        {
          name: 'api',
          image: 'stand-in/local',
          command: [
            process.execPath,
            '-e',
            "require('http').createServer((q, r) => r.end('ok')).listen(8080)",
          ],
          ports: [{ containerPort: 8080, name: 'http' }],
        },
      ],
    });
  });

  afterAll(async () => {
    await cluster?.close();
    dir?.remove();
  });

  const containerId = (name: string): string =>
    target.containers.find((container) => container.name === name)!.containerId;

  /** No Job was created, and no request asked for one. */
  function expectNothingCreated(): void {
    expect(cluster.requests.filter((request) => request.method !== 'GET')).toEqual([]);
    expect(cluster.jobs()).toEqual([]);
    expect(cluster.pods().map((pod) => pod.metadata.name)).toEqual(['api']);
  }

  test('prints the Job with every field, for the default container, and creates nothing', async () => {
    const result = await cli([
      'mirror',
      '--pod',
      'api',
      '--kubeconfig',
      cluster.kubeconfigPath,
      '--dry-run',
      '--agent-image',
      'registry.example/team/mirrord-agent:1.2.3',
      '--agent-pull-policy',
      'Always',
      '--agent-pull-secret',
      'regcred',
      '--agent-pull-secret',
      'mirror-pull',
      '--agent-ttl',
      '45',
      '--agent-idle-timeout',
      '12',
    ]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const job = loadYaml<V1Job>(result.stdout);
    const sessionId = job.metadata?.labels?.['mirrord.dev/session'] ?? '';
    expect(sessionId).toMatch(/^[0-9a-f]{8}$/);
    const cliAnnotation = job.metadata?.annotations?.['mirrord.dev/cli'] ?? '';
    const [host = '', pid = ''] = cliAnnotation.split('/');
    expectAgentJob(job, {
      sessionId,
      namespace: 'default',
      node: cluster.nodeName,
      containerId: containerId('api'),
      target: 'pod default/api (container api)',
      image: 'registry.example/team/mirrord-agent:1.2.3',
      pullPolicy: 'Always',
      pullSecrets: ['regcred', 'mirror-pull'],
      capabilities: false,
      ttlSeconds: 45,
      idleTimeoutSeconds: 12,
      cli: { host, pid: Number(pid) },
    });
    expectNothingCreated();
  });

  test('defaults: the agent image of this version, TTL 60 s, idle timeout 30 s; --container and --agent-capabilities', async () => {
    const result = await cli([
      'mirror',
      '--pod',
      'api',
      '--container',
      'istio-proxy',
      '--agent-capabilities',
      '--kubeconfig',
      cluster.kubeconfigPath,
      '--dry-run',
    ]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const job = loadYaml<V1Job>(result.stdout);
    const [host = '', pid = ''] = (job.metadata?.annotations?.['mirrord.dev/cli'] ?? '').split('/');
    expectAgentJob(job, {
      sessionId: job.metadata?.labels?.['mirrord.dev/session'] ?? '',
      namespace: 'default',
      node: cluster.nodeName,
      containerId: containerId('istio-proxy'),
      target: 'pod default/api (container istio-proxy)',
      image: `ghcr.io/mirrord-dev/mirrord-agent:${VERSION}`,
      pullSecrets: [],
      capabilities: true,
      ttlSeconds: 60,
      idleTimeoutSeconds: 30,
      cli: { host, pid: Number(pid) },
    });
    expectNothingCreated();
  });

  test('mirrord.json holds the same settings (flags win); bad ones give one line', async () => {
    const config = join(dir.path, 'mirrord.json');
    writeFileSync(
      config,
      JSON.stringify({
        pod: 'api',
        container: 'api',
        namespace: 'default',
        kubeconfig: cluster.kubeconfigPath,
        agentImage: 'registry.example/mirrord-agent:from-file',
        agentPullPolicy: 'Never',
        agentPullSecrets: ['from-file'],
        agentCapabilities: true,
        agentTtl: 5,
        agentIdleTimeout: 6,
        agentStartupTimeout: 7,
      }),
    );
    const result = await cli(['mirror', '--dry-run', '--agent-ttl', '8'], dir.path);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const job = loadYaml<V1Job>(result.stdout);
    const [host = '', pid = ''] = (job.metadata?.annotations?.['mirrord.dev/cli'] ?? '').split('/');
    expectAgentJob(job, {
      sessionId: job.metadata?.labels?.['mirrord.dev/session'] ?? '',
      namespace: 'default',
      node: cluster.nodeName,
      containerId: containerId('api'),
      target: 'pod default/api (container api)',
      image: 'registry.example/mirrord-agent:from-file',
      pullPolicy: 'Never',
      pullSecrets: ['from-file'],
      capabilities: true,
      ttlSeconds: 8,
      idleTimeoutSeconds: 6,
      cli: { host, pid: Number(pid) },
    });
    expectNothingCreated();

    const cases: [object, RegExp][] = [
      [{ pod: 'api', netns: 'staging' }, /give one target, not "pod" and "netns"/],
      [{ pod: 'api', agentTtl: -1 }, /"agentTtl" must be a number of seconds \(0 or more\)/],
      [{ deployment: 'Web_1' }, /"deployment" must be a Kubernetes name/],
      [
        { pod: 'api', agentPullPolicy: 'Sometimes' },
        /"agentPullPolicy" must be Always, IfNotPresent or Never/,
      ],
      [{ netns: 'staging', namespace: 'x' }, /"namespace" applies to Kubernetes targets/],
      [
        { pod: 'api', agentImages: 'x' },
        /unknown key "agentImages" \(known: pod, deployment, statefulset, container, namespace, context, kubeconfig, agentImage/,
      ],
    ];
    for (const [settings, message] of cases) {
      writeFileSync(config, JSON.stringify(settings));
      const bad = await cli(['mirror', '--dry-run'], dir.path);
      expect(bad.code).not.toBe(0);
      expect(bad.stdout).toBe('');
      const lines = bad.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(message);
    }
    expectNothingCreated();
  });
});
