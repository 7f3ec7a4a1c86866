/**
 * The agent's Job and the Secret that hands it its session secret: every field the issue asks
 * for, as a pure function of the options; as `mirrord mirror --dry-run` prints them for a pod of
 * the real test cluster (valid YAML of a Job and a Secret without data, and nothing created);
 * and as the real API server accepts them: the printed YAML, sent as it is with strict field
 * validation through server-side dry run (every admission step, nothing stored), comes back
 * unchanged but for the fields the API server defaults.
 */
import { KubeConfig, loadAllYaml, type V1Job, type V1Secret } from '@kubernetes/client-node';
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { request, type RequestOptions } from 'node:https';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  AGENT_CAPABILITIES,
  AGENT_PORT,
  agentJobManifest,
  agentSecretManifest,
  type AgentJobOptions,
} from '../src/platform/kube/agent-job.js';
import { testCluster, type PodInfo, type TestCluster } from './support/kube.js';
import { tempDir } from './support/mirror-cli.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const CLI = join(ROOT, 'bin', 'run.js');
const VERSION = (
  JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }
).version;
const NAMESPACE = 'kube-job';

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
  // The agent gets the target's container ID and finds its PID itself; its session secret
  // is a file of the Secret named like the Job, never a value in the Job.
  expect(container!.command).toEqual([
    'mirrord',
    'agent',
    '--container-id',
    options.containerId,
    '--listen',
    `127.0.0.1:${AGENT_PORT}`,
    '--idle-timeout',
    String(options.idleTimeoutSeconds),
    '--secret-file',
    '/var/run/mirrord/secret',
  ]);
  expect(container!.env).toBeUndefined();
  expect(container!.volumeMounts).toEqual([
    { name: 'mirrord-secret', mountPath: '/var/run/mirrord', readOnly: true },
  ]);
  expect(pod.volumes).toEqual([
    {
      name: 'mirrord-secret',
      secret: {
        secretName: `mirrord-agent-${options.sessionId}`,
        items: [{ key: 'secret', path: 'secret' }],
        defaultMode: 0o400,
      },
    },
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
  capabilities: true,
  ttlSeconds: 45,
  idleTimeoutSeconds: 12,
  cli: { host: 'laptop', pid: 4242 },
};

describe('the agent Job manifest', () => {
  test('has every field the issue lists, with just the capabilities the agent needs by default', () => {
    expectAgentJob(agentJobManifest(OPTIONS), OPTIONS);
  });

  test('with --agent-privileged: a privileged container', () => {
    const options = { ...OPTIONS, capabilities: false, pullSecrets: [], pullPolicy: undefined };
    const job = agentJobManifest(options);
    expectAgentJob(job, options);
    expect(job.spec?.template.spec?.imagePullSecrets).toBeUndefined();
    expect(job.spec?.template.spec?.containers[0]?.imagePullPolicy).toBeUndefined();
  });

  test('its Secret: named and labelled like the Job, owned by it once it exists, the secret its one key', () => {
    const job = agentJobManifest(OPTIONS);
    // As --dry-run prints it: no data (made at each start), no owner (the Job's uid).
    expectPrintedSecret(agentSecretManifest(job), job);
    const secret = 'c2Vzc2lvbi1zZWNyZXQtb2YtMzItcmFuZG9tLWJ5dGVzIQ';
    const created = agentSecretManifest(job, { jobUid: 'f00d-uid', secret });
    expect(created.metadata?.ownerReferences).toEqual([
      { apiVersion: 'batch/v1', kind: 'Job', name: 'mirrord-agent-0a1b2c3d', uid: 'f00d-uid' },
    ]);
    expect(Object.keys(created.data ?? {})).toEqual(['secret']);
    expect(Buffer.from(created.data!.secret!, 'base64').toString()).toBe(secret);
    // Nowhere in the Job, which anyone allowed `get jobs` reads.
    expect(JSON.stringify(job)).not.toContain(secret);
    expect(JSON.stringify(job)).not.toContain(created.data!.secret!);
  });
});

/** The Secret as --dry-run prints it for `job`: every field, and neither data nor owner. */
function expectPrintedSecret(secret: V1Secret, job: V1Job): void {
  expect(secret).toEqual({
    apiVersion: 'v1',
    kind: 'Secret',
    metadata: {
      name: job.metadata!.name,
      namespace: job.metadata!.namespace,
      labels: job.metadata!.labels,
    },
    type: 'Opaque',
    immutable: true,
  });
}

/**
 * What --dry-run printed: the Job, then (after `---`) the Secret the session creates after it;
 * each document also as its text, to send to the API server as printed.
 */
function printedManifests(stdout: string): {
  job: V1Job;
  secret: V1Secret;
  texts: { job: string; secret: string };
} {
  const texts = stdout.split(/^---\n/m);
  expect(texts).toHaveLength(2);
  const [job, secret] = loadAllYaml(stdout) as [V1Job, V1Secret];
  expectPrintedSecret(secret, job);
  return { job, secret, texts: { job: texts[0]!, secret: texts[1]! } };
}

/** Who the server-side dry runs write as, in the object's managedFields. */
const FIELD_MANAGER = 'mirrord-test';

/**
 * What the API server makes of a Job's or a Secret's YAML, sent as it is: a create with
 * server-side dry run (every admission step runs, nothing is stored) and strict field validation
 * (an unknown or duplicate field is an error, not silently dropped). Its status and raw JSON
 * answer: the object as it would be stored, including fields this client library has no model
 * for.
 */
async function serverDryRun(
  kubeconfig: string,
  kind: 'jobs' | 'secrets',
  yaml: string,
): Promise<{ status: number; body: Record<string, unknown> }> {
  const collection =
    kind === 'jobs'
      ? `/apis/batch/v1/namespaces/${NAMESPACE}/jobs`
      : `/api/v1/namespaces/${NAMESPACE}/secrets`;
  const config = new KubeConfig();
  config.loadFromFile(kubeconfig);
  const server = new URL(config.getCurrentCluster()!.server);
  const options: RequestOptions = {
    method: 'POST',
    hostname: server.hostname,
    port: server.port,
    path: `${collection}?dryRun=All&fieldValidation=Strict&fieldManager=${FIELD_MANAGER}`,
    headers: { 'content-type': 'application/yaml', accept: 'application/json' },
  };
  await config.applyToHTTPSOptions(options);
  return new Promise((resolve, reject) => {
    const post = request(options, (response) => {
      let text = '';
      response.setEncoding('utf8');
      response.on('data', (chunk: string) => (text += chunk));
      response.on('end', () =>
        resolve({
          status: response.statusCode ?? 0,
          body: JSON.parse(text) as Record<string, unknown>,
        }),
      );
      response.on('error', reject);
    });
    post.on('error', reject);
    post.end(yaml);
  });
}

/**
 * The printed Job as the API server stores it: unchanged, plus exactly the fields Kubernetes
 * 1.34 defaults or adds on create, each only where the Job leaves it out (a field the Job sets
 * keeps the Job's value, so a server that changed one fails the comparison).
 */
function withServerDefaults(printed: V1Job, uid: string): Record<string, unknown> {
  const job = structuredClone(printed);
  const spec = job.spec!;
  // One pod to one completion: what a Job that sets neither count means.
  spec.completions ??= 1;
  spec.parallelism ??= 1;
  spec.completionMode ??= 'NonIndexed';
  spec.suspend ??= false;
  // Failed pods are replaced once terminated: the default when there is no podFailurePolicy.
  spec.podReplacementPolicy ??= 'TerminatingOrFailed';
  // Without manualSelector the server generates the selector from the Job's uid, and labels
  // the pod template to match (with the legacy unprefixed labels too).
  spec.manualSelector ??= false;
  spec.selector ??= { matchLabels: { 'batch.kubernetes.io/controller-uid': uid } };
  const name = job.metadata!.name!;
  spec.template.metadata!.labels = {
    ...spec.template.metadata!.labels,
    'batch.kubernetes.io/controller-uid': uid,
    'batch.kubernetes.io/job-name': name,
    'controller-uid': uid,
    'job-name': name,
  };
  // Pod defaults.
  const pod = spec.template.spec!;
  pod.dnsPolicy ??= 'ClusterFirst';
  pod.schedulerName ??= 'default-scheduler';
  pod.securityContext ??= {};
  for (const container of pod.containers) {
    // For a tag other than :latest.
    container.imagePullPolicy ??= 'IfNotPresent';
    container.terminationMessagePath ??= '/dev/termination-log';
    container.terminationMessagePolicy ??= 'File';
  }
  return {
    ...job,
    // Object identity and bookkeeping, set on every create: which client set which fields
    // (server-side apply's record, here of a plain create) is in managedFields.
    metadata: {
      ...job.metadata,
      uid,
      creationTimestamp: expect.any(String),
      generation: 1,
      managedFields: [
        {
          manager: FIELD_MANAGER,
          operation: 'Update',
          apiVersion: 'batch/v1',
          time: expect.any(String),
          fieldsType: 'FieldsV1',
          fieldsV1: expect.any(Object),
        },
      ],
    },
    status: {},
  };
}

describe('mirrord mirror --dry-run (real cluster)', () => {
  let cluster: TestCluster;
  let target: PodInfo;
  let dir: ReturnType<typeof tempDir>;

  beforeAll(async () => {
    cluster = await testCluster(NAMESPACE);
    dir = tempDir('kube-job');
    // A mesh sidecar first: the default container must be the app behind it.
    target = await cluster.addPod('api', [
      { name: 'istio-proxy', command: ['node', '-e', 'setInterval(() => {}, 3_600_000)'] },
      {
        name: 'api',
        command: ['node', '-e', "require('http').createServer((q, r) => r.end('ok')).listen(8080)"],
        port: 8080,
      },
    ]);
  }, 600_000);

  afterAll(async () => {
    await cluster?.remove();
    dir?.remove();
  }, 300_000);

  const kube = (): string[] => ['--kubeconfig', cluster.kubeconfig, '-n', NAMESPACE];

  const containerId = (name: string): string =>
    target.containers.find((container) => container.name === name)!.containerId;

  /**
   * No Job, Secret or agent pod was created, and no Job request came since `since` (the audit
   * log's length before), except this test's own server-side dry runs.
   */
  async function expectNothingCreated(since: number): Promise<void> {
    const requests = cluster.jobRequests(since);
    expect(requests.filter((event) => !event.requestURI.includes('dryRun=All'))).toEqual([]);
    expect(await cluster.mirrordObjects()).toEqual([]);
    const pods = await cluster.core.listNamespacedPod({ namespace: NAMESPACE });
    expect(pods.items.map((pod) => pod.metadata?.name)).toEqual(['api']);
  }

  test('prints the Job with every field and its Secret without data, for the default container, and creates nothing', async () => {
    const since = cluster.jobRequests().length;
    const result = await cli([
      'mirror',
      '--pod',
      'api',
      ...kube(),
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
      '--agent-privileged',
    ]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const { job } = printedManifests(result.stdout);
    const sessionId = job.metadata?.labels?.['mirrord.dev/session'] ?? '';
    expect(sessionId).toMatch(/^[0-9a-f]{8}$/);
    const cliAnnotation = job.metadata?.annotations?.['mirrord.dev/cli'] ?? '';
    const [host = '', pid = ''] = cliAnnotation.split('/');
    expectAgentJob(job, {
      sessionId,
      namespace: NAMESPACE,
      node: cluster.nodeName,
      containerId: containerId('api'),
      target: `pod ${NAMESPACE}/api (container api)`,
      image: 'registry.example/team/mirrord-agent:1.2.3',
      pullPolicy: 'Always',
      pullSecrets: ['regcred', 'mirror-pull'],
      capabilities: false,
      ttlSeconds: 45,
      idleTimeoutSeconds: 12,
      cli: { host, pid: Number(pid) },
    });
    // The kubelet's ID of the container, as the agent looks it up in /proc/*/cgroup.
    expect(containerId('api')).toMatch(/^containerd:\/\/[0-9a-f]{64}$/);
    await expectNothingCreated(since);
  });

  test('defaults: the agent image of this version, TTL 60 s, idle timeout 30 s, capabilities; --container', async () => {
    const since = cluster.jobRequests().length;
    const result = await cli([
      'mirror',
      '--pod',
      'api',
      '--container',
      'istio-proxy',
      ...kube(),
      '--dry-run',
    ]);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const { job } = printedManifests(result.stdout);
    const [host = '', pid = ''] = (job.metadata?.annotations?.['mirrord.dev/cli'] ?? '').split('/');
    expectAgentJob(job, {
      sessionId: job.metadata?.labels?.['mirrord.dev/session'] ?? '',
      namespace: NAMESPACE,
      node: cluster.nodeName,
      containerId: containerId('istio-proxy'),
      target: `pod ${NAMESPACE}/api (container istio-proxy)`,
      image: `ghcr.io/mirrord-dev/mirrord-agent:${VERSION}`,
      pullSecrets: [],
      capabilities: true,
      ttlSeconds: 60,
      idleTimeoutSeconds: 30,
      cli: { host, pid: Number(pid) },
    });
    await expectNothingCreated(since);
  });

  test('the real API server accepts the printed Job and Secret as printed: with capabilities, and with --agent-privileged', async () => {
    const since = cluster.jobRequests().length;
    const variants: { args: string[]; securityContext: object }[] = [
      { args: ['--agent-privileged'], securityContext: { privileged: true } },
      {
        args: [
          '--container',
          'istio-proxy',
          '--agent-pull-policy',
          'Never',
          '--agent-pull-secret',
          'regcred',
        ],
        securityContext: { privileged: false, capabilities: { add: AGENT_CAPABILITIES } },
      },
    ];
    for (const variant of variants) {
      const result = await cli(['mirror', '--pod', 'api', ...kube(), '--dry-run', ...variant.args]);
      expect(result.code).toBe(0);
      const printed = printedManifests(result.stdout);
      const stored = await serverDryRun(cluster.kubeconfig, 'jobs', printed.texts.job);
      expect({ variant: variant.args, status: stored.status, body: stored.body }).toMatchObject({
        status: 201,
      });
      const uid = (stored.body.metadata as { uid?: string }).uid ?? '';
      expect(uid).toMatch(/^[0-9a-f-]{36}$/);
      expect(stored.body).toEqual(withServerDefaults(printed.job, uid));
      const spec = (stored.body as unknown as V1Job).spec!.template.spec!;
      expect(spec.containers[0]?.securityContext).toEqual(variant.securityContext);

      // The Secret as printed is one the API server takes, and stores unchanged.
      const secret = await serverDryRun(cluster.kubeconfig, 'secrets', printed.texts.secret);
      expect({ status: secret.status, body: secret.body }).toMatchObject({ status: 201 });
      expect(secret.body).toEqual({
        ...printed.secret,
        metadata: {
          ...printed.secret.metadata,
          uid: expect.stringMatching(/^[0-9a-f-]{36}$/),
          creationTimestamp: expect.any(String),
          managedFields: [
            {
              manager: FIELD_MANAGER,
              operation: 'Update',
              apiVersion: 'v1',
              time: expect.any(String),
              fieldsType: 'FieldsV1',
              fieldsV1: expect.any(Object),
            },
          ],
        },
      });
    }
    await expectNothingCreated(since);
  });

  test('mirrord.json holds the same settings (flags win); bad ones give one line', async () => {
    const since = cluster.jobRequests().length;
    const config = join(dir.path, 'mirrord.json');
    writeFileSync(
      config,
      JSON.stringify({
        pod: 'api',
        container: 'api',
        namespace: NAMESPACE,
        kubeconfig: cluster.kubeconfig,
        agentImage: 'registry.example/mirrord-agent:from-file',
        agentPullPolicy: 'Never',
        agentPullSecrets: ['from-file'],
        agentPrivileged: false,
        agentTtl: 5,
        agentIdleTimeout: 6,
        agentStartupTimeout: 7,
      }),
    );
    const result = await cli(['mirror', '--dry-run', '--agent-ttl', '8'], dir.path);
    expect(result.stderr).toBe('');
    expect(result.code).toBe(0);
    const { job } = printedManifests(result.stdout);
    const [host = '', pid = ''] = (job.metadata?.annotations?.['mirrord.dev/cli'] ?? '').split('/');
    expectAgentJob(job, {
      sessionId: job.metadata?.labels?.['mirrord.dev/session'] ?? '',
      namespace: NAMESPACE,
      node: cluster.nodeName,
      containerId: containerId('api'),
      target: `pod ${NAMESPACE}/api (container api)`,
      image: 'registry.example/mirrord-agent:from-file',
      pullPolicy: 'Never',
      pullSecrets: ['from-file'],
      capabilities: true,
      ttlSeconds: 8,
      idleTimeoutSeconds: 6,
      cli: { host, pid: Number(pid) },
    });
    await expectNothingCreated(since);

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
    await expectNothingCreated(since);
  });
});
