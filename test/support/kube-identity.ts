/**
 * Users of the real test cluster that the real authorizer limits: a ServiceAccount whose Role
 * grants some rules, and a kubeconfig with a token of it, for tests of what a denied verb does.
 */
import { AuthorizationV1Api, KubeConfig, type V1PolicyRule } from '@kubernetes/client-node';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { TestCluster } from './kube.js';
import { waitFor } from './wait.js';

/**
 * Everything the CLI needs, as the README lists it, and `get pods/portforward`: what 1.34 checks
 * for a port-forward over WebSocket (a GET).
 */
export const FULL_RULES: V1PolicyRule[] = [
  { apiGroups: [''], resources: ['pods'], verbs: ['get', 'list', 'watch'] },
  { apiGroups: [''], resources: ['pods/log'], verbs: ['get'] },
  { apiGroups: [''], resources: ['pods/portforward'], verbs: ['get', 'create'] },
  { apiGroups: ['batch'], resources: ['jobs'], verbs: ['create', 'delete'] },
  { apiGroups: [''], resources: ['secrets'], verbs: ['create'] },
  { apiGroups: ['apps'], resources: ['deployments', 'statefulsets'], verbs: ['get'] },
];

/** FULL_RULES without one verb on one resource. */
export function rulesWithout(verb: string, resource: string): V1PolicyRule[] {
  return FULL_RULES.map((rule) =>
    rule.resources?.includes(resource)
      ? { ...rule, verbs: rule.verbs.filter((v) => v !== verb) }
      : rule,
  ).filter((rule) => rule.verbs.length > 0);
}

/** A kubeconfig as a file holds it (JSON is YAML). */
export interface KubeconfigJson {
  apiVersion: string;
  kind: string;
  clusters: {
    name: string;
    cluster: { server: string; 'certificate-authority-data'?: string; 'tls-server-name'?: string };
  }[];
  users: { name: string; user: Record<string, string> }[];
  contexts: { name: string; context: { cluster: string; user: string; namespace?: string } }[];
  'current-context': string;
}

/**
 * A ServiceAccount `name` in the cluster's namespace whose Role grants `rules`, and a
 * kubeconfig in `dir` with a token of it (TokenRequest API), its context in that namespace.
 * Resolves once the authorizer grants what the Role grants.
 */
export async function identity(
  cluster: TestCluster,
  name: string,
  rules: V1PolicyRule[],
  dir: string,
): Promise<string> {
  const namespace = cluster.namespace;
  await cluster.core.createNamespacedServiceAccount({ namespace, body: { metadata: { name } } });
  await cluster.rbac.createNamespacedRole({ namespace, body: { metadata: { name }, rules } });
  await cluster.rbac.createNamespacedRoleBinding({
    namespace,
    body: {
      metadata: { name },
      roleRef: { apiGroup: 'rbac.authorization.k8s.io', kind: 'Role', name },
      subjects: [{ kind: 'ServiceAccount', name, namespace }],
    },
  });
  const { status } = await cluster.core.createNamespacedServiceAccountToken({
    name,
    namespace,
    body: { spec: { audiences: [], expirationSeconds: 3600 } },
  });
  const admin = new KubeConfig();
  admin.loadFromFile(cluster.kubeconfig);
  const authorization = admin.makeApiClient(AuthorizationV1Api);
  // The authorizer learns of new Roles and bindings from its informers: wait until it grants
  // what the Role grants (the binding is in effect).
  const user = `system:serviceaccount:${namespace}:${name}`;
  await waitFor(
    `RBAC to take the binding of ${name}`,
    async () => {
      const review = await authorization
        .createSubjectAccessReview({
          body: {
            spec: { user, resourceAttributes: { namespace, verb: 'list', resource: 'pods' } },
          },
        })
        .catch(() => undefined);
      return review?.status?.allowed === true;
    },
    { ms: 60_000, everyMs: 100 },
  );
  const { server, caData } = admin.getCurrentCluster()!;
  const path = join(dir, `${name}.kubeconfig`);
  const kubeconfig: KubeconfigJson = {
    apiVersion: 'v1',
    kind: 'Config',
    clusters: [{ name: 'mirrord-dev', cluster: { server, 'certificate-authority-data': caData } }],
    users: [{ name, user: { token: status!.token } }],
    contexts: [{ name, context: { cluster: 'mirrord-dev', user: name, namespace } }],
    'current-context': name,
  };
  writeFileSync(path, JSON.stringify(kubeconfig), { mode: 0o600 });
  return path;
}
