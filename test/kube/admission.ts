import { randomUUID } from 'node:crypto';
import { badRequest, invalid, type StatusCause } from './errors.js';
import {
  RESOURCES,
  ownerReferenceTo,
  type Container,
  type Job,
  type KubeObject,
  type ObjectMeta,
  type Pod,
  type PodSpec,
  type PodTemplateSpec,
} from './types.js';

/**
 * What the API server does to an object before storing it: validation (422 Invalid with the
 * real messages, for the mistakes a client creating Jobs can make) and defaulting (the fields a
 * controller or the kubelet reads later).
 */

const DNS_SUBDOMAIN = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$/;
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const LABEL_VALUE = /^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$/;
const LABEL_NAME = /^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$/;

const SUBDOMAIN_MESSAGE =
  "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MESSAGE =
  "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MESSAGE =
  "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

function required(field: string, detail?: string): StatusCause {
  return {
    reason: 'FieldValueRequired',
    message: detail ? `Required value: ${detail}` : 'Required value',
    field,
  };
}

function invalidValue(field: string, value: unknown, detail: string): StatusCause {
  return {
    reason: 'FieldValueInvalid',
    message: `Invalid value: ${JSON.stringify(value)}: ${detail}`,
    field,
  };
}

function validateLabels(labels: unknown, field: string): StatusCause[] {
  if (labels === undefined) return [];
  if (typeof labels !== 'object' || labels === null) {
    return [invalidValue(field, labels, 'must be a map of strings')];
  }
  const causes: StatusCause[] = [];
  for (const [key, value] of Object.entries(labels)) {
    const [prefix, name] = key.includes('/') ? key.split('/', 2) : [undefined, key];
    if (
      !name ||
      name.length > 63 ||
      !LABEL_NAME.test(name) ||
      (prefix !== undefined && (prefix.length > 253 || !DNS_SUBDOMAIN.test(prefix)))
    ) {
      causes.push(
        invalidValue(
          field,
          key,
          "name part must be no more than 63 characters and consist of alphanumeric characters, '-', '_' or '.'",
        ),
      );
    }
    if (typeof value !== 'string') {
      causes.push(invalidValue(`${field}`, value, 'must be a string'));
    } else if (value.length > 63) {
      causes.push(invalidValue(field, value, 'must be no more than 63 characters'));
    } else if (!LABEL_VALUE.test(value)) {
      causes.push(invalidValue(field, value, LABEL_VALUE_MESSAGE));
    }
  }
  return causes;
}

function validateContainers(containers: unknown, field: string): StatusCause[] {
  if (!Array.isArray(containers) || containers.length === 0) return [required(field)];
  const causes: StatusCause[] = [];
  const seen = new Set<string>();
  containers.forEach((raw: Partial<Container>, index) => {
    const at = `${field}[${index}]`;
    if (!raw.name) causes.push(required(`${at}.name`));
    else if (raw.name.length > 63 || !DNS_LABEL.test(raw.name)) {
      causes.push(invalidValue(`${at}.name`, raw.name, LABEL_MESSAGE));
    } else if (seen.has(raw.name)) {
      causes.push({
        reason: 'FieldValueDuplicate',
        message: `Duplicate value: "${raw.name}"`,
        field: `${at}.name`,
      });
    }
    if (raw.name) seen.add(raw.name);
    if (!raw.image) causes.push(required(`${at}.image`));
    for (const [p, port] of (raw.ports ?? []).entries()) {
      if (
        !Number.isInteger(port.containerPort) ||
        port.containerPort < 1 ||
        port.containerPort > 65535
      ) {
        causes.push(
          invalidValue(
            `${at}.ports[${p}].containerPort`,
            port.containerPort,
            'must be between 1 and 65535, inclusive',
          ),
        );
      }
    }
  });
  return causes;
}

function nonNegative(value: unknown, field: string): StatusCause[] {
  if (value === undefined) return [];
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
    return [invalidValue(field, value, 'must be greater than or equal to 0')];
  }
  return [];
}

/** Checks a Job a client sent; throws 400 or 422 as the real API server does. */
export function validateJob(body: unknown, namespace: string): Job {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw badRequest(
      'the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf',
    );
  }
  const job = body as Partial<Job>;
  if (job.kind !== undefined && job.kind !== 'Job') {
    throw badRequest(
      `the kind of the provided object (${job.kind}) does not match the expected kind (Job)`,
    );
  }
  if (job.apiVersion !== undefined && job.apiVersion !== 'batch/v1') {
    throw badRequest(
      `the API version in the data (${job.apiVersion}) does not match the expected API version (batch/v1)`,
    );
  }
  const metadata: ObjectMeta = job.metadata ?? {};
  if (metadata.namespace !== undefined && metadata.namespace !== namespace) {
    throw badRequest(
      'the namespace of the provided object does not match the namespace sent on the request',
    );
  }
  const name = metadata.name ?? metadata.generateName ?? '';
  const causes: StatusCause[] = [];
  if (!metadata.name && !metadata.generateName) {
    causes.push(required('metadata.name', 'name or generateName is required'));
  } else if (metadata.name && (metadata.name.length > 253 || !DNS_SUBDOMAIN.test(metadata.name))) {
    causes.push(invalidValue('metadata.name', metadata.name, SUBDOMAIN_MESSAGE));
  } else if (metadata.name && metadata.name.length > 63) {
    // The name becomes the job-name label of its pods.
    causes.push(
      invalidValue('spec.template.labels', metadata.name, 'must be no more than 63 characters'),
    );
  }
  causes.push(...validateLabels(metadata.labels, 'metadata.labels'));
  const spec = job.spec;
  if (!spec || typeof spec !== 'object') {
    causes.push(required('spec.template.spec.containers'));
  } else {
    const template: Partial<PodTemplateSpec> = spec.template ?? {};
    causes.push(...validateLabels(template.metadata?.labels, 'spec.template.metadata.labels'));
    const podSpec: Partial<PodSpec> = template.spec ?? {};
    causes.push(...validateContainers(podSpec.containers, 'spec.template.spec.containers'));
    const restart = podSpec.restartPolicy;
    if (restart === undefined) {
      causes.push(
        required('spec.template.spec.restartPolicy', 'valid values: "OnFailure", "Never"'),
      );
    } else if (restart !== 'Never' && restart !== 'OnFailure') {
      causes.push({
        reason: 'FieldValueNotSupported',
        message: `Unsupported value: "${restart}": supported values: "OnFailure", "Never"`,
        field: 'spec.template.spec.restartPolicy',
      });
    }
    causes.push(...nonNegative(spec.backoffLimit, 'spec.backoffLimit'));
    causes.push(...nonNegative(spec.ttlSecondsAfterFinished, 'spec.ttlSecondsAfterFinished'));
    if (
      spec.activeDeadlineSeconds !== undefined &&
      (!Number.isInteger(spec.activeDeadlineSeconds) || spec.activeDeadlineSeconds <= 0)
    ) {
      causes.push(
        invalidValue(
          'spec.activeDeadlineSeconds',
          spec.activeDeadlineSeconds,
          'must be greater than 0',
        ),
      );
    }
  }
  if (causes.length) throw invalid(RESOURCES.jobs, name, causes);
  return job as Job;
}

/** Drops what only the server sets, as the real API server ignores it on create. */
function freshMetadata(metadata: ObjectMeta, namespace: string): ObjectMeta {
  const {
    uid: _uid,
    resourceVersion: _resourceVersion,
    creationTimestamp: _creationTimestamp,
    deletionTimestamp: _deletionTimestamp,
    deletionGracePeriodSeconds: _deletionGracePeriodSeconds,
    generation: _generation,
    ...rest
  } = metadata;
  return { ...rest, namespace };
}

function defaultPodSpec(spec: PodSpec): PodSpec {
  return {
    ...spec,
    restartPolicy: spec.restartPolicy ?? 'Always',
    terminationGracePeriodSeconds: spec.terminationGracePeriodSeconds ?? 30,
    dnsPolicy: 'ClusterFirst',
    schedulerName: 'default-scheduler',
    containers: spec.containers.map((c) => ({
      ...c,
      imagePullPolicy:
        c.imagePullPolicy ??
        (/:[^/]+$/.test(c.image) && !c.image.endsWith(':latest') ? 'IfNotPresent' : 'Always'),
      terminationMessagePath: '/dev/termination-log',
      terminationMessagePolicy: 'File',
    })),
  };
}

/** A validated Job with the defaults and the selector the real API server adds. */
export function admitJob(job: Job, namespace: string): Job {
  const uid = randomUUID();
  const metadata = { ...freshMetadata(job.metadata, namespace), uid };
  const name = metadata.name ?? '';
  const selectorLabels = { 'batch.kubernetes.io/controller-uid': uid };
  const templateMetadata = job.spec.template.metadata ?? {};
  return {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata,
    spec: {
      ...job.spec,
      backoffLimit: job.spec.backoffLimit ?? 6,
      completions: job.spec.completions ?? 1,
      parallelism: job.spec.parallelism ?? 1,
      completionMode: job.spec.completionMode ?? 'NonIndexed',
      suspend: job.spec.suspend ?? false,
      selector: job.spec.selector ?? { matchLabels: selectorLabels },
      template: {
        metadata: {
          ...templateMetadata,
          labels: {
            ...templateMetadata.labels,
            'batch.kubernetes.io/controller-uid': uid,
            'batch.kubernetes.io/job-name': name,
            'controller-uid': uid,
            'job-name': name,
          },
        },
        spec: defaultPodSpec(job.spec.template.spec),
      },
    },
    status: {},
  };
}

/** A pod as a controller makes it from its template, owned by `owner`. */
export function podFromTemplate(
  owner: KubeObject,
  template: PodTemplateSpec,
  name: { name: string } | { generateName: string },
  extraLabels: Record<string, string> = {},
): Pod {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: {
      ...name,
      namespace: owner.metadata.namespace,
      labels: { ...template.metadata?.labels, ...extraLabels },
      ...(template.metadata?.annotations ? { annotations: template.metadata.annotations } : {}),
      ownerReferences: [ownerReferenceTo(owner)],
    },
    spec: defaultPodSpec(template.spec),
    status: { phase: 'Pending' },
  };
}

export function newPodFromTemplate(job: Job): Pod {
  return podFromTemplate(job, job.spec.template, { generateName: `${job.metadata.name}-` });
}

/** A bare pod (no owner), defaulted as the API server would. */
export function admitPod(pod: Pod, namespace: string): Pod {
  return {
    apiVersion: 'v1',
    kind: 'Pod',
    metadata: freshMetadata(pod.metadata, namespace),
    spec: defaultPodSpec(pod.spec),
    status: { phase: 'Pending' },
  };
}
