"""Every auditable action: a name, a code numbered in ranges per domain, and the label the trail stores.

Values never change once released: the codes and labels are part of every recorded event and of its hash.
"""

from __future__ import annotations

import enum


class AuditAction(enum.Enum):
    """Every auditable action, numbered in ranges per domain. Values never change once released."""

    # 1000: authentication
    AUTH_LOGIN = (1001, "auth.login")
    AUTH_LOGIN_FAILED = (1002, "auth.login_failed")
    AUTH_LOGOUT = (1003, "auth.logout")
    AUTH_LOCKED_OUT = (1004, "auth.locked_out")
    AUTH_SESSION_EXPIRED = (1005, "auth.session_expired")
    AUTH_REAUTH_FAILED = (1006, "auth.reauth_failed")
    TWOFA_ENROLL = (1007, "auth.2fa_enroll")
    TWOFA_FAILURE = (1008, "auth.2fa_failure")
    # 1100: accounts, tokens, teams
    TOKEN_CREATE = (1101, "token.create")
    TOKEN_REVOKE = (1102, "token.revoke")
    TEAM_CREATE = (1111, "team.create")
    TEAM_MEMBER_ADD = (1112, "team.member_add")
    TEAM_MEMBER_REMOVE = (1113, "team.member_remove")
    USER_CREATE = (1121, "user.create")
    USER_ROLE_CHANGE = (1122, "user.role_change")
    ADMIN_ADD = (1131, "admin.add")
    ADMIN_CHANGE = (1132, "admin.change")
    ADMIN_DELETE = (1133, "admin.delete")
    # 2000: registry
    MODEL_REGISTER = (2001, "model.register")
    MODEL_TAGS_CHANGE = (2002, "model.tags_change")
    VERSION_UPLOAD = (2011, "version.upload")
    VERSION_UPLOAD_REJECTED = (2012, "version.upload_rejected")
    VERSION_SCAN_VERDICT = (2013, "version.scan_verdict")
    VERSION_TRUST_DECISION = (2014, "version.trust_decision")
    VERSION_DOWNLOAD = (2015, "version.download")
    REFERENCE_DOWNLOAD = (2016, "reference.download")
    TEAM_TRUSTED_TYPE_ADD = (2017, "team.trusted_type_add")
    VERSION_IMPORT_DUPLICATE = (2018, "version.import_duplicate")
    VERSION_TAGS_CHANGE = (2019, "version.tags_change")
    VERSION_EXPLAINED = (2020, "version.explained")
    MODEL_ALIAS_SET = (2031, "model.alias_set")
    MODEL_ALIAS_DELETE = (2032, "model.alias_delete")
    # 2100: the MLflow integration (registry webhooks in, aliases out)
    MLFLOW_CONNECT = (2101, "mlflow.connect")
    MLFLOW_WEBHOOK_RECEIVE = (2102, "mlflow.webhook_receive")
    MLFLOW_WEBHOOK_REFUSE = (2103, "mlflow.webhook_refuse")
    MLFLOW_IMPORT = (2104, "mlflow.import")
    MLFLOW_IMPORT_FAIL = (2105, "mlflow.import_fail")
    MLFLOW_ALIAS_SET = (2106, "mlflow.alias_set")
    MLFLOW_ALIAS_FAIL = (2107, "mlflow.alias_fail")
    MLFLOW_DISCONNECT = (2108, "mlflow.disconnect")
    MLFLOW_JOB_RETRY = (2109, "mlflow.job_retry")
    MLFLOW_RECONCILE = (2110, "mlflow.reconcile")
    # 3000: deployments and traffic
    DEPLOYMENT_CREATE = (3001, "deployment.create")
    DEPLOYMENT_LIVE = (3002, "deployment.live")
    DEPLOYMENT_FAIL = (3003, "deployment.fail")
    TRAFFIC_SWITCH = (3011, "traffic.switch")
    FEEDBACK_RECEIVE = (3101, "feedback.receive")
    PREDICTION_PAYLOAD_VIEW = (3102, "prediction.payload_view")
    FEEDBACK_REFUSE = (3103, "feedback.refuse")
    # 3200: batch scoring
    BATCH_SUBMIT = (3201, "batch.submit")
    BATCH_CANCEL = (3202, "batch.cancel")
    BATCH_DONE = (3203, "batch.done")
    BATCH_FAIL = (3204, "batch.fail")
    BATCH_DOWNLOAD = (3205, "batch.download")
    BATCH_SCHEDULE_CREATE = (3211, "batch_schedule.create")
    BATCH_SCHEDULE_CHANGE = (3212, "batch_schedule.change")
    BATCH_SCHEDULE_DELETE = (3213, "batch_schedule.delete")
    # 3300: monitoring
    ALERT_FIRE = (3301, "alert.fire")
    ALERT_ACKNOWLEDGE = (3302, "alert.acknowledge")
    ALERT_RESOLVE = (3303, "alert.resolve")
    MONITORING_SETTINGS_CHANGE = (3311, "monitoring.settings_change")
    # 3340: A/B experiments
    EXPERIMENT_START = (3341, "experiment.start")
    EXPERIMENT_SETTINGS_CHANGE = (3342, "experiment.settings_change")
    EXPERIMENT_VERDICT = (3343, "experiment.verdict")
    EXPERIMENT_STOP = (3344, "experiment.stop")
    EXPERIMENT_GUARDRAIL_BREACH = (3345, "experiment.guardrail_breach")
    # 3400: datasets cut from production, retraining, lineage
    DATASET_CREATE = (3401, "dataset.create")
    DATASET_READY = (3402, "dataset.ready")
    DATASET_FAIL = (3403, "dataset.fail")
    DATASET_DOWNLOAD = (3404, "dataset.download")
    DATASET_ERASE_ROWS = (3405, "dataset.erase_rows")
    DATASET_DOWNLOAD_REFUSED = (3406, "dataset.download_refused")
    RETRAIN_POLICY_CHANGE = (3411, "retraining.policy_change")
    RETRAIN_REQUEST = (3412, "retraining.request")
    RETRAIN_CALL = (3413, "retraining.call")
    RETRAIN_FAIL = (3414, "retraining.fail")
    RETRAIN_CLOSE = (3415, "retraining.close")
    VERSION_TRAINED_ON = (3421, "version.trained_on")
    VERSION_ERASED_DATA_FLAG = (3422, "version.erased_data_flag")
    VERSION_ERASED_DATA_DECISION = (3423, "version.erased_data_decision")
    # 3500: edge packages, device tokens and what devices upload
    EDGE_PACKAGE_REQUEST = (3501, "edge.package_request")
    EDGE_PACKAGE_READY = (3502, "edge.package_ready")
    EDGE_PACKAGE_FAIL = (3503, "edge.package_fail")
    EDGE_PACKAGE_DOWNLOAD = (3504, "edge.package_download")
    EDGE_TOKEN_CREATE = (3511, "edge.token_create")
    EDGE_TOKEN_REVOKE = (3512, "edge.token_revoke")
    EDGE_UPLOAD_REFUSED = (3513, "edge.upload_refused")
    # 3600: multi-model endpoints (routing rules in front of several models)
    ENDPOINT_CREATE = (3601, "endpoint.create")
    ENDPOINT_CHANGE = (3602, "endpoint.change")
    ENDPOINT_DELETE = (3603, "endpoint.delete")
    # 4000: promotion, approvals, rollback, notifications
    PROMOTION_REQUEST = (4001, "promotion.request")
    PROMOTION_APPROVE = (4002, "promotion.approve")
    PROMOTION_REJECT = (4003, "promotion.reject")
    PROMOTION_CANCEL = (4004, "promotion.cancel")
    PROMOTION_DEPLOY = (4005, "promotion.deploy")
    PROMOTION_LIVE = (4006, "promotion.live")
    PROMOTION_FAIL = (4007, "promotion.fail")
    PROMOTION_GATE_OVERRIDE = (4008, "promotion.gate_override")
    PROMOTION_UNBLOCKED = (4009, "promotion.unblocked")
    ENVIRONMENT_ROLLBACK = (4011, "environment.rollback")
    WEBHOOK_CREATE = (4021, "webhook.create")
    # 5000: data subjects
    GDPR_SUBJECT_ACCESS = (5001, "gdpr.subject_access")
    GDPR_ERASURE = (5002, "gdpr.erasure")
    SUBJECT_EXPLANATION_READ = (5003, "subject.explanation_read")
    RETENTION_PURGE = (5011, "retention.purge")
    RETENTION_DROP_PARTITION = (5012, "retention.drop_partition")
    PAYLOAD_KEYS_ROTATE = (5021, "payload_keys.rotate")
    # 1900: the audit trail itself
    AUDIT_VERIFY = (1901, "audit.verify")
    AUDIT_EXPORT = (1902, "audit.export")
    AUDIT_CHECKPOINT = (1903, "audit.checkpoint")

    def __init__(self, code: int, label: str) -> None:
        self.code = code
        self.label = label
