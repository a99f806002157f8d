"""Offline checks of infra/ (the Bicep CLI cannot run here): every file parses, the function app's
app settings match what relay/settings.py reads, secrets arrive through Key Vault, the role ids are
Azure's built-in ones, the alert rules watch the relay's metrics and e-mail the operator, telemetry
has what it needs, and each check is shown to catch the mistake it exists for.

The Bicep is read with pycep-parser, whose tree keeps identifiers and string literals alike as
Python strings: `name: site` and `name: 'site'` both give "site". The checks below only compare
names, so that is enough; `checkov -d infra --framework bicep` (make lint) covers security settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycep import BicepParser

from relay import telemetry
from relay.settings import CHANNEL_SWITCHES, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
FUNCTION_APP = INFRA / "modules" / "function-app.bicep"
ROLE_ASSIGNMENTS = INFRA / "modules" / "role-assignments.bicep"
PARAMETERS = INFRA / "main.parameters.json"

# Azure's built-in role definition ids (docs: "Azure built-in roles"), as the issue lists them.
BUILT_IN_ROLES = {
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Table Data Contributor": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Key Vault Secrets User": "4633458b-17de-408a-b874-0445c86b69e6",
}

# App settings read by the platform, the Functions host or the Azure SDKs rather than by
# relay/settings.py. Each must be provisioned: the deployment does not work without it.
PLATFORM_SETTINGS = {
    "AzureWebJobsStorage__blobServiceUri": "host: leases, timer schedules (identity-based storage)",
    "AZURE_CLIENT_ID": "azure-identity: DefaultAzureCredential picks the user-assigned identity",
}

# Catalogued settings with a default that a deployment must still set explicitly.
DEPLOYMENT_MUST_SET = {
    "RELAY_POLL_SCHEDULE": "the host resolves %RELAY_POLL_SCHEDULE% in the timer binding itself: no setting, no poller",
    "RELAY_PUBLIC_BASE_URL": "providers sign over the public URL; in Azure that is the app's own host name",
    "AzureWebJobsStorage__credential": "identity-based storage",
    "AzureWebJobsStorage__clientId": "identity-based storage with the user-assigned identity",
    "AzureWebJobsStorage__tableServiceUri": "identity-based storage for the relay's tables",
    "AzureWebJobsStorage__queueServiceUri": "identity-based storage: the host's queue trigger and the poll queue",
    "RELAY_POLL_QUEUE": "the host resolves %RELAY_POLL_QUEUE% in poll_batch's queue trigger: no setting, no fan-out",
}

# What Flex Consumption refuses or ignores (Learn, "Flex Consumption plan deprecations",
# https://learn.microsoft.com/azure/azure-functions/functions-app-settings#flex-consumption-plan-deprecations).
# A site property of these names fails the deployment (ftpsState: ARM error 51021) or is ignored.
FLEX_REJECTED_PROPERTIES = {
    "alwaysOn", "isReserved", "IsXenon", "windowsFxVersion", "containerSize", "dnsConfiguration", "ftpsState",
    "javaVersion", "netFrameworkVersion", "powerShellVersion", "linuxFxVersion", "functionAppScaleLimit",
    "preWarmedInstanceCount", "use32BitWorkerProcess", "vnetBackupRestoreEnabled", "vnetContentShareEnabled",
    "vnetImagePullEnabled", "vnetRouteAllEnabled",
}
FLEX_REJECTED_SETTINGS = {
    "ENABLE_ORYX_BUILD", "SCM_DO_BUILD_DURING_DEPLOYMENT", "FUNCTIONS_EXTENSION_VERSION", "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_WORKER_RUNTIME_VERSION", "WEBSITE_NODE_DEFAULT_VERSION", "FUNCTIONS_MAX_HTTP_CONCURRENCY",
    "FUNCTIONS_WORKER_PROCESS_COUNT", "FUNCTIONS_WORKER_DYNAMIC_CONCURRENCY_ENABLED",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "WEBSITE_CONTENTSHARE", "WEBSITE_CONTENTOVERVNET",
    "WEBSITE_VNET_ROUTE_ALL", "WEBSITE_DNS_SERVER", "WEBSITE_MAX_DYNAMIC_APPLICATION_SCALE_OUT",
    "WEBSITE_RUN_FROM_PACKAGE", "WEBSITE_SKIP_CONTENTSHARE_VALIDATION",
}

# Regions that do not offer Flex Consumption (absent from `az functionapp list-flexconsumption-locations`
# and from the Azure-Samples Flex Consumption templates' lists), and the early-access canary.
NOT_FLEX_REGIONS = {"eastus2euap", "centraluseuap", "westindia", "brazilsoutheast", "jioindiawest", "qatarcentral"}

# Catalogued settings without a useful default that Azure deliberately does not get.
NOT_PROVISIONED = {
    "AzureWebJobsStorage": "a connection string needs shared keys, which are off; the identity settings replace it",
    "AzureWebJobsStorage__accountName": "a shorthand for the service URIs, which are provisioned instead",
}


def parse(text: str) -> dict:
    return BicepParser().parse(text=text)


def accessor(*names: str) -> dict:
    """pycep's tree of `a.b.c`."""
    head, *rest = names
    tail = accessor(*rest) if len(rest) > 1 else rest[0]
    return {"operator": {"type": "property_accessor", "operands": {"operand_1": head, "operand_2": tail}}}


def unquote(key: str) -> str:
    return key[1:-1] if key.startswith("'") and key.endswith("'") else key


def strings(node) -> Iterator[str]:
    """Every string leaf of a parsed expression (identifiers and literals alike)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def _dict_literal(node, *, where: str, problems: list[str]) -> dict:
    if isinstance(node, dict) and "function" not in node and "operator" not in node:
        return {unquote(k): v for k, v in node.items()}
    problems.append(f"{where} is not an object literal, so its setting names cannot be checked")
    return {}


def provisioned_app_settings(main: dict, function_app: dict, problems: list[str]) -> dict[str, object]:
    """The function app's app settings (name -> parsed value expression), from the `appsettings`
    config resource in function-app.bicep: an object literal or `union(...)` of variables, of module
    parameters (whose object literal main.bicep passes) and of object literals."""
    configs = [
        r["config"] for r in function_app.get("resources", {}).values()
        if r["type"] == "Microsoft.Web/sites/config" and r["config"].get("name") == "appsettings"
    ]
    if len(configs) != 1:
        problems.append(f"expected one appsettings config resource in {FUNCTION_APP.name}, found {len(configs)}")
        return {}
    properties = configs[0]["properties"]
    if isinstance(properties, dict) and properties.get("function", {}).get("type") == "union":
        parts = list(properties["function"]["parameters"].values())
    else:
        parts = [properties]
    module_params = next(
        (m["config"]["params"] for m in main.get("modules", {}).values()
         if m["detail"]["path"] == f"modules/{FUNCTION_APP.name}"),
        {},
    )
    settings: dict[str, object] = {}
    for part in parts:
        if isinstance(part, str) and part in function_app.get("variables", {}):
            block = _dict_literal(function_app["variables"][part]["value"], where=f"variable {part}", problems=problems)
        elif isinstance(part, str) and part in function_app.get("parameters", {}):
            block = _dict_literal(module_params.get(part), where=f"main.bicep's {part}", problems=problems)
        else:
            block = _dict_literal(part, where="an appsettings part", problems=problems)
        for name in block.keys() & settings.keys():
            problems.append(f"{name} is provisioned twice")
        settings.update(block)
    return settings


def is_key_vault_reference(value) -> bool:
    return any(s.startswith("${kvRef}") or s.startswith("@Microsoft.KeyVault(SecretUri=") for s in strings(value))


def check_app_settings(settings: dict[str, object]) -> list[str]:
    """What is wrong between the app settings and the catalogue: a setting the relay needs in Azure
    that is missing, one nobody reads, a secret given in clear, a fallback that differs from the
    relay's default."""
    problems = []
    for name in settings:
        if name not in SETTINGS and name not in PLATFORM_SETTINGS:
            problems.append(
                f"{name} is provisioned but nothing reads it: remove it, catalogue it in relay/settings.py, "
                "or add it to PLATFORM_SETTINGS here with who reads it"
            )
    for name, setting in SETTINGS.items():
        needed = not setting.default or name in DEPLOYMENT_MUST_SET
        if needed and name not in NOT_PROVISIONED and name not in settings:
            why = DEPLOYMENT_MUST_SET.get(name) or (
                "required" if setting.default is None else "no default: only the deployer knows its value"
            )
            problems.append(
                f"{name} is not provisioned ({why}): add it to the app settings in infra/ "
                "(and a parameter in main.bicep and main.parameters.json), or to NOT_PROVISIONED here with the reason"
            )
    for name in PLATFORM_SETTINGS:
        if name not in settings:
            problems.append(f"{name} is not provisioned ({PLATFORM_SETTINGS[name]})")
    for name, value in settings.items():
        setting = SETTINGS.get(name)
        if setting and setting.secret and not is_key_vault_reference(value):
            problems.append(f"{name} is a secret but its app setting is not a Key Vault reference")
        conditional = value.get("operator", {}) if isinstance(value, dict) else {}
        if setting and not setting.secret and conditional.get("type") == "conditional":
            fallback = conditional["operands"]["true_value"]
            if fallback != (setting.default or ""):
                problems.append(
                    f"{name} falls back to {fallback!r} but relay/settings.py's default is {setting.default!r}")
    return problems


def keys(node) -> Iterator[str]:
    """Every object key of a parsed template, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield unquote(key)
            yield from keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from keys(value)


def _site_config_app_settings(parsed: dict) -> list[dict]:
    return [entry for resource in parsed.get("resources", {}).values()
            for entry in (resource["config"].get("properties", {}).get("siteConfig", {}).get("appSettings") or [])
            if isinstance(entry, dict) and isinstance(entry.get("name"), str)]


def check_flex_consumption(templates: dict[str, dict], settings: dict[str, object]) -> list[str]:
    """Every property and app setting Flex Consumption rejects, wherever it appears."""
    rejected = {name.lower(): name for name in FLEX_REJECTED_PROPERTIES}
    problems = [
        f"{file}: {key} is rejected on Flex Consumption (Learn: Flex Consumption plan deprecations)"
        for file, parsed in templates.items()
        for key in sorted(set(keys([parsed.get(part, {}) for part in ("resources", "variables", "modules")])))
        if key.lower() in rejected
    ]
    # siteConfig.appSettings, the other way to give app settings: [{name: ..., value: ...}, ...]
    settings = {**settings, **{unquote(entry["name"]): entry.get("value")
                               for parsed in templates.values() for entry in _site_config_app_settings(parsed)}}
    problems += [f"app setting {name} is rejected on Flex Consumption (Learn: Flex Consumption plan deprecations)"
                 for name in sorted(settings) if name.upper() in FLEX_REJECTED_SETTINGS]
    return problems


def check_parameter_wiring(main: dict, parameters: dict) -> list[str]:
    """Each relay setting in main.bicep is fed by parameters that azd fills from the environment
    variable of the same name, and each Key Vault reference names the secret holding that parameter."""
    problems = []
    params = main["parameters"]
    secrets = {unquote(k): v for k, v in main["variables"]["secrets"]["value"].items()}
    mapped = {name: entry.get("value") for name, entry in parameters["parameters"].items()}
    relay_settings = main["modules"]["app"]["config"]["params"]["relaySettings"]
    for setting, value in relay_settings.items():
        leaves = list(strings(value))
        for param in {s for s in leaves if s in params}:
            if mapped.get(param) != f"${{{setting}}}":
                problems.append(f"{setting} is fed by parameter {param}, which azd fills from {mapped.get(param)!r}")
        for leaf in leaves:
            match = re.fullmatch(r"\$\{kvRef\}([a-z0-9-]+)/\)", leaf)
            if not match:
                continue
            stored = secrets.get(match[1])
            if stored is None:
                problems.append(f"{setting} references Key Vault secret {match[1]}, which main.bicep does not store")
            elif mapped.get(stored) != f"${{{setting}}}":
                problems.append(f"{setting} references Key Vault secret {match[1]}, which holds parameter {stored} "
                                f"(filled from {mapped.get(stored)!r})")
    for name in mapped.keys() - params.keys():
        problems.append(f"main.parameters.json sets {name}, which main.bicep does not declare")
    for name in params:
        if name not in mapped and params[name].get("default") is None:
            problems.append(f"parameter {name} has no default and no value in main.parameters.json")
    return problems


def role_reference(node, variables: dict, loop: dict | None) -> list[str]:
    """The role ids a roleDefinitionId's role name expression stands for."""
    if isinstance(node, str):
        if loop and node == loop["detail"].get("item_name"):
            items = variables[loop["detail"]["array_name"]]["value"]
            return [rid for item in items for rid in role_reference(item, variables, None)]
        return [node]
    operator = node.get("operator", {})
    if operator.get("type") == "property_accessor" and operator["operands"]["operand_1"] in variables:
        table = variables[operator["operands"]["operand_1"]]["value"]
        return [table.get(operator["operands"]["operand_2"], "<no such role>")]
    return ["<unreadable>"]


def check_role_assignments(parsed: dict) -> list[str]:
    """Every role assigned is a built-in role of the issue's list, named guid(scope.id, principal, role),
    and the relay's identity holds each of them."""
    problems = []
    known = set(BUILT_IN_ROLES.values())
    held_by_identity: set[str] = set()
    variables = parsed.get("variables", {})
    for name, resource in parsed.get("resources", {}).items():
        if resource["type"] != "Microsoft.Authorization/roleAssignments":
            continue
        config = resource["config"]
        loop = config.get("loop_type")
        body = config["config"] if loop or "condition" in config else config
        definition = body["properties"]["roleDefinitionId"]["function"]
        if definition["type"] != "subscription_resource_id" or (
            definition["parameters"]["resource_type"] != "Microsoft.Authorization/roleDefinitions"
        ):
            problems.append(f"{name}: roleDefinitionId is not subscriptionResourceId('...roleDefinitions', id)")
            continue
        role_ids = role_reference(definition["parameters"]["resource_name_1"], variables, loop)
        problems += [f"{name}: {rid} is not one of the built-in roles" for rid in role_ids if rid not in known]
        guid = body["name"].get("function", {}) if isinstance(body["name"], dict) else {}
        args = list(guid.get("parameters", {}).values())
        scope_id = accessor(body["scope"], "id")
        role_arg = definition["parameters"]["resource_name_1"]
        if guid.get("type") != "guid" or args != [scope_id, body["properties"]["principalId"], role_arg]:
            problems.append(f"{name}: name is not guid(scope.id, principalId, roleId)")
        if body["properties"].get("principalType") not in ("ServicePrincipal", "userPrincipalType"):
            problems.append(f"{name}: principalType must be set")
        if body["properties"]["principalId"] == "identityPrincipalId":
            held_by_identity.update(role_ids)
    for role, rid in BUILT_IN_ROLES.items():
        if rid not in held_by_identity:
            problems.append(f"the relay's identity is not assigned {role} ({rid})")
    return problems


@pytest.fixture(scope="module")
def main() -> dict:
    return parse(MAIN.read_text())


@pytest.fixture(scope="module")
def function_app() -> dict:
    return parse(FUNCTION_APP.read_text())


@pytest.fixture(scope="module")
def parameters() -> dict:
    return json.loads(PARAMETERS.read_text())


# --- every file parses --------------------------------------------------------------------------


BICEP_FILES = sorted(INFRA.rglob("*.bicep"))


def test_infra_has_the_main_template_and_modules():
    assert MAIN in BICEP_FILES and FUNCTION_APP in BICEP_FILES and ROLE_ASSIGNMENTS in BICEP_FILES


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_bicep_file_parses(path: Path):
    parsed = parse(path.read_text())
    assert parsed.get("resources") or parsed.get("modules")


def test_a_syntax_error_fails_the_parse():
    broken = MAIN.read_text().replace("location: location\n  tags: tags\n}", "location: location\n  tags: \n}", 1)
    assert broken != MAIN.read_text()
    with pytest.raises(Exception, match="Unexpected"):
        parse(broken)


def test_modules_are_local_files_not_registry_modules(main):
    for name, module in main["modules"].items():
        assert module["type"] == "local", f"module {name} must be a local file so offline tools can read it"
        assert (INFRA / module["detail"]["path"]).is_file()


# --- app settings against relay/settings.py ------------------------------------------------------


def test_app_settings_match_the_settings_catalogue(main, function_app):
    problems: list[str] = []
    settings = provisioned_app_settings(main, function_app, problems)
    problems += check_app_settings(settings)
    assert problems == []


def test_the_app_settings_check_catches_a_removed_setting(main):
    text = FUNCTION_APP.read_text()
    mutated = re.sub(r"\n\s*AZURE_CLIENT_ID: identityClientId", "", text)
    assert mutated != text
    problems: list[str] = []
    settings = provisioned_app_settings(main, parse(mutated), problems)
    assert any(p.startswith("AZURE_CLIENT_ID is not provisioned") for p in check_app_settings(settings))

    main_text = MAIN.read_text()
    mutated_main = re.sub(r"\n\s*DIRECTLINE_SECRET: .*", "", main_text)
    assert mutated_main != main_text
    problems = []
    settings = provisioned_app_settings(parse(mutated_main), parse(text), problems)
    assert any(p.startswith("DIRECTLINE_SECRET is not provisioned") for p in check_app_settings(settings))


def check_optional_secret(main: dict, parameters: dict) -> list[str]:
    """A Copilot Studio agent needs no secret: the deployer gives the secret or the token endpoint, and the
    secret's Key Vault reference exists only when a secret was given (an empty one stores nothing)."""
    problems = []
    params = main["parameters"]
    for name in ("directLineSecret", "directLineTokenEndpoint"):
        if params.get(name, {}).get("default") != "":
            problems.append(f"parameter {name} must be optional (default '')")
    if any(d["type"] == "min_length" for d in params["directLineSecret"].get("decorators", [])):
        problems.append("directLineSecret must not have a minimum length")
    relay_settings = main["modules"]["app"]["config"]["params"]["relaySettings"]
    value = relay_settings.get("DIRECTLINE_SECRET")
    conditional = value.get("operator", {}) if isinstance(value, dict) else {}
    operands = conditional.get("operands", {})
    if not (conditional.get("type") == "conditional"
            and operands.get("condition") == {"function": {"type": "empty",
                                                           "parameters": {"item_to_test": "directLineSecret"}}}
            and operands.get("true_value") == "" and is_key_vault_reference(operands.get("false_value"))):
        problems.append("DIRECTLINE_SECRET must be empty(directLineSecret) ? '' : <its Key Vault reference>")
    if relay_settings.get("DIRECTLINE_TOKEN_ENDPOINT") != "directLineTokenEndpoint":
        problems.append("DIRECTLINE_TOKEN_ENDPOINT must be the directLineTokenEndpoint parameter")
    if parameters["parameters"].get("directLineTokenEndpoint", {}).get("value") != "${DIRECTLINE_TOKEN_ENDPOINT}":
        problems.append("azd must fill directLineTokenEndpoint from DIRECTLINE_TOKEN_ENDPOINT")
    return problems


def test_the_direct_line_secret_is_optional_beside_a_token_endpoint(main, parameters):
    assert check_optional_secret(main, parameters) == []


@pytest.mark.parametrize(("before", "after", "problem"), [
    ("DIRECTLINE_SECRET: empty(directLineSecret) ? '' : '${kvRef}directline-secret/)'",
     "DIRECTLINE_SECRET: '${kvRef}directline-secret/)'", "DIRECTLINE_SECRET must be"),
    ("param directLineSecret string = ''", "@minLength(1)\nparam directLineSecret string",
     "parameter directLineSecret must be optional"),
])
def test_the_optional_secret_check_catches_a_required_secret(parameters, before, after, problem):
    text = MAIN.read_text()
    mutated = text.replace(before, after)
    assert mutated != text
    assert any(p.startswith(problem) for p in check_optional_secret(parse(mutated), parameters))


def test_the_app_settings_check_catches_an_unread_setting_and_a_clear_secret(main, function_app):
    problems: list[str] = []
    settings = provisioned_app_settings(main, function_app, problems)
    settings["FUNCTIONS_WORKER_RUNTIME"] = "python"  # Flex Consumption rejects it; nothing reads it
    settings["TWILIO_AUTH_TOKEN"] = "twilioAuthToken"
    settings["RELAY_POLL_SCHEDULE"] = {"operator": {"type": "conditional", "operands": {
        "condition": {}, "true_value": "*/1 * * * * *", "false_value": "pollSchedule"}}}
    problems = check_app_settings(settings)
    assert any(p.startswith("FUNCTIONS_WORKER_RUNTIME is provisioned but nothing reads it") for p in problems)
    assert "TWILIO_AUTH_TOKEN is a secret but its app setting is not a Key Vault reference" in problems
    assert any(p.startswith("RELAY_POLL_SCHEDULE falls back to") for p in problems)


def test_a_duplicated_setting_is_reported(main):
    text = FUNCTION_APP.read_text().replace(
        "AZURE_CLIENT_ID: identityClientId", "AZURE_CLIENT_ID: identityClientId\n  DIRECTLINE_BOT_IDS: ''")
    problems: list[str] = []
    provisioned_app_settings(main, parse(text), problems)
    assert problems == ["DIRECTLINE_BOT_IDS is provisioned twice"]


def test_identity_and_telemetry_settings_name_the_user_assigned_identity(main, function_app):
    settings = provisioned_app_settings(main, function_app, [])
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == settings["AZURE_CLIENT_ID"] == "identityClientId"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=${identityClientId};Authorization=AAD"
    assert settings["RELAY_PUBLIC_BASE_URL"] == "https://${site.properties.defaultHostName}"
    assert main["modules"]["app"]["config"]["params"]["identityClientId"] == accessor("identity", "outputs", "clientId")


def test_each_setting_is_fed_by_the_azd_variable_of_its_name(main, parameters):
    assert check_parameter_wiring(main, parameters) == []


def test_the_wiring_check_catches_a_crossed_parameter(main, parameters):
    text = MAIN.read_text()
    mutated = text.replace("BIRD_WORKSPACE_ID: birdWorkspaceId", "BIRD_WORKSPACE_ID: birdChannelId")
    assert mutated != text
    assert check_parameter_wiring(parse(mutated), parameters) == [
        "BIRD_WORKSPACE_ID is fed by parameter birdChannelId, which azd fills from '${BIRD_CHANNEL_ID}'"
    ]
    mutated = text.replace("empty(birdAccessKey) ? '' : '${kvRef}bird-access-key/)'",
                           "empty(birdAccessKey) ? '' : '${kvRef}bird-signing-key/)'")
    assert mutated != text
    assert check_parameter_wiring(parse(mutated), parameters) == [
        "BIRD_ACCESS_KEY references Key Vault secret bird-signing-key, which holds parameter birdSigningKey "
        "(filled from '${BIRD_SIGNING_KEY}')"
    ]


def test_the_wiring_check_catches_a_parameter_azd_cannot_fill(main, parameters):
    entries = dict(parameters["parameters"])
    del entries["directLineSecret"], entries["environmentName"]
    entries["directLineSecrets"] = {"value": "${DIRECTLINE_SECRET}"}
    assert sorted(check_parameter_wiring(main, {"parameters": entries})) == [
        "DIRECTLINE_SECRET is fed by parameter directLineSecret, which azd fills from None",
        "DIRECTLINE_SECRET references Key Vault secret directline-secret, which holds parameter directLineSecret "
        "(filled from None)",
        "main.parameters.json sets directLineSecrets, which main.bicep does not declare",
        "parameter environmentName has no default and no value in main.parameters.json",
    ]


def test_every_secret_parameter_is_secure_and_stored_in_key_vault(main):
    secrets = {unquote(k): v for k, v in main["variables"]["secrets"]["value"].items()}
    for name in secrets.values():
        assert {"type": "secure"} in main["parameters"][name]["decorators"], f"{name} must be @secure()"
    key_vault = main["modules"]["keyVault"]["config"]["params"]
    assert key_vault["secrets"] == "secrets"
    vault_module = parse((INFRA / main["modules"]["keyVault"]["detail"]["path"]).read_text())
    assert {"type": "secure"} in vault_module["parameters"]["secrets"]["decorators"]


# --- roles --------------------------------------------------------------------------------------


def test_role_assignments_use_the_built_in_role_ids():
    assert check_role_assignments(parse(ROLE_ASSIGNMENTS.read_text())) == []


def test_the_role_check_catches_a_wrong_role_id():
    text = ROLE_ASSIGNMENTS.read_text()
    mutated = text.replace("b7e6dc6d-f1e8-4753-8033-0f276bb0955b", "b7e6dc6d-f1e8-4753-8033-0f276bb0955c")
    assert mutated != text
    problems = check_role_assignments(parse(mutated))
    assert "identityStorage: b7e6dc6d-f1e8-4753-8033-0f276bb0955c is not one of the built-in roles" in problems
    assert ("the relay's identity is not assigned Storage Blob Data Owner (b7e6dc6d-f1e8-4753-8033-0f276bb0955b)"
            in problems)


def test_the_role_check_catches_a_missing_role_and_a_bad_name():
    text = ROLE_ASSIGNMENTS.read_text()
    mutated = text.replace("  roles.storageQueueDataContributor\n", "")
    assert mutated != text
    assert check_role_assignments(parse(mutated)) == [
        "the relay's identity is not assigned Storage Queue Data Contributor (974c5e8b-45b9-4653-ba55-5f855dd0fb88)"
    ]
    mutated = text.replace("guid(vault.id, identityPrincipalId, roles.keyVaultSecretsUser)",
                           "guid(vault.id, roles.keyVaultSecretsUser)")
    assert mutated != text
    assert check_role_assignments(parse(mutated)) == [
        "identitySecrets: name is not guid(scope.id, principalId, roleId)"]


def test_no_other_guid_hides_in_the_templates():
    guid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
    for path in BICEP_FILES:
        for found in guid.findall(path.read_text()):
            assert found in BUILT_IN_ROLES.values(), f"{path.name}: {found} is not a known built-in role id"


# --- the resources the issue asks for -----------------------------------------------------------


def _resources(path: Path) -> dict[str, dict]:
    return {r["type"] + ":" + name: r["config"] for name, r in parse(path.read_text())["resources"].items()}


def test_flex_consumption_app_is_python_311_https_only_without_ftp(main, function_app):
    resources = {r["type"]: r["config"] for r in function_app["resources"].values()
                 if r["type"] != "Microsoft.Web/sites/basicPublishingCredentialsPolicies"}
    plan = resources["Microsoft.Web/serverfarms"]
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"} and plan["properties"]["reserved"] is True
    site = resources["Microsoft.Web/sites"]
    assert site["kind"] == "functionapp,linux"
    assert site["identity"]["type"] == "UserAssigned"
    props = site["properties"]
    assert props["httpsOnly"] is True
    assert props["keyVaultReferenceIdentity"] == "identityId"
    assert props["siteConfig"]["minTlsVersion"] == "1.2" and "ftpsState" not in props["siteConfig"]
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["scaleAndConcurrency"] == {"maximumInstanceCount": "maximumInstanceCount",
                                             "instanceMemoryMB": "instanceMemoryMB"}
    assert config["deployment"]["storage"]["authentication"] == {
        "type": "UserAssignedIdentity", "userAssignedIdentityResourceId": "identityId"}
    policies = {r["config"]["name"]: r["config"]["properties"] for r in function_app["resources"].values()
                if r["type"] == "Microsoft.Web/sites/basicPublishingCredentialsPolicies"}
    assert policies == {"ftp": {"allow": False}, "scm": {"allow": False}}
    assert main["modules"]["app"]["config"]["params"]["maximumInstanceCount"] == "maximumInstanceCount"
    assert main["modules"]["app"]["config"]["params"]["instanceMemoryMB"] == "instanceMemoryMB"


def test_storage_key_vault_and_monitoring_are_keyless():
    storage = _resources(INFRA / "modules" / "storage.bicep")["Microsoft.Storage/storageAccounts:storage"]["properties"]
    assert storage["allowSharedKeyAccess"] is False and storage["allowBlobPublicAccess"] is False
    assert storage["minimumTlsVersion"] == "TLS1_2"
    vault = _resources(INFRA / "modules" / "key-vault.bicep")["Microsoft.KeyVault/vaults:vault"]["properties"]
    assert vault["enableRbacAuthorization"] is True
    assert vault["enableSoftDelete"] is True
    monitoring = _resources(INFRA / "modules" / "monitoring.bicep")
    assert monitoring["Microsoft.Insights/components:applicationInsights"]["properties"]["DisableLocalAuth"] is True
    workspace = monitoring["Microsoft.OperationalInsights/workspaces:workspace"]["properties"]
    assert workspace["features"]["disableLocalAuth"] is True


def test_outputs_give_each_channel_webhook_and_the_token_endpoint(main):
    outputs = {name: out["value"] for name, out in main["outputs"].items()}
    for channel in CHANNEL_SWITCHES:
        assert outputs[f"{channel.upper()}_WEBHOOK_URL"] == f"${{app.outputs.url}}/api/channels/{channel}"
    assert outputs["DIRECTLINE_TOKEN_URL"] == "${app.outputs.url}/api/directline/token"
    assert outputs["RELAY_URL"] == accessor("app", "outputs", "url")
    assert "AZURE_LOCATION" in outputs


def test_azure_yaml_deploys_the_relay_service_to_the_tagged_function_app(function_app):
    text = (ROOT / "azure.yaml").read_text()
    assert re.search(r"^services:\n  relay:\n    project: \.\n    language: python\n    host: function$", text, re.M)
    site = next(r["config"] for r in function_app["resources"].values() if r["type"] == "Microsoft.Web/sites")
    assert site["tags"]["function"]["parameters"]["arg_2"] == {"'azd-service-name'": "relay"}


# --- Flex Consumption, and a second `azd up` --------------------------------------------------------


@pytest.fixture(scope="module")
def templates() -> dict[str, dict]:
    """Every file of infra/, parsed (pycep takes seconds a file: once per module)."""
    return {str(path.relative_to(INFRA)): parse(path.read_text()) for path in BICEP_FILES}


def test_nothing_flex_consumption_rejects_is_provisioned(main, function_app, templates):
    settings = provisioned_app_settings(main, function_app, [])
    assert check_flex_consumption(templates, settings) == []


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("      minTlsVersion: '1.2'\n", "      minTlsVersion: '1.2'\n      ftpsState: 'Disabled'\n",
     "modules/function-app.bicep: ftpsState is rejected"),
    ("      minTlsVersion: '1.2'\n", "      minTlsVersion: '1.2'\n      linuxFxVersion: 'Python|3.11'\n",
     "modules/function-app.bicep: linuxFxVersion is rejected"),
    ("    httpsOnly: true\n", "    httpsOnly: true\n    use32BitWorkerProcess: false\n",
     "modules/function-app.bicep: use32BitWorkerProcess is rejected"),
    ("  AZURE_CLIENT_ID: identityClientId\n",
     "  AZURE_CLIENT_ID: identityClientId\n  FUNCTIONS_WORKER_RUNTIME: 'python'\n",
     "app setting FUNCTIONS_WORKER_RUNTIME is rejected"),
    ("  AZURE_CLIENT_ID: identityClientId\n",
     "  AZURE_CLIENT_ID: identityClientId\n  WEBSITE_RUN_FROM_PACKAGE: '1'\n",
     "app setting WEBSITE_RUN_FROM_PACKAGE is rejected"),
    ("  AZURE_CLIENT_ID: identityClientId\n",
     "  AZURE_CLIENT_ID: identityClientId\n  WEBSITE_CONTENTSHARE: name\n  FUNCTIONS_EXTENSION_VERSION: '~4'\n",
     "app setting WEBSITE_CONTENTSHARE is rejected"),
    ("      http20Enabled: true\n",
     "      http20Enabled: true\n      appSettings: [\n        {\n          name: 'FUNCTIONS_EXTENSION_VERSION'\n"
     "          value: '~4'\n        }\n      ]\n",
     "app setting FUNCTIONS_EXTENSION_VERSION is rejected"),
    ("var platformSettings = {\n", "var webConfig = {\n  alwaysOn: false\n}\nvar platformSettings = {\n",
     "modules/function-app.bicep: alwaysOn is rejected"),
])
def test_the_flex_check_refuses_each_rejected_property_and_setting(main, templates, old, new, problem):
    text = FUNCTION_APP.read_text()
    mutated = text.replace(old, new, 1)
    assert mutated != text
    mutated_templates = {**templates, "modules/function-app.bicep": parse(mutated)}
    settings = provisioned_app_settings(main, mutated_templates["modules/function-app.bicep"], [])
    assert any(p.startswith(problem) for p in check_flex_consumption(mutated_templates, settings))


def test_ftp_stays_off_through_the_publishing_policy_and_checkov_knows_why(function_app):
    policies = {r["config"]["name"]: r["config"]["properties"] for r in function_app["resources"].values()
                if r["type"] == "Microsoft.Web/sites/basicPublishingCredentialsPolicies"}
    assert policies["ftp"] == {"allow": False}
    assert re.search(r"checkov:skip=CKV_AZURE_78: Flex Consumption rejects siteConfig\.ftpsState",
                     FUNCTION_APP.read_text())


def test_the_location_must_be_a_flex_consumption_region(main):
    location = main["parameters"]["location"]
    allowed = next(d["argument"] for d in location["decorators"] if d["type"] == "allowed")
    assert len(allowed) == len(set(allowed)) and all(re.fullmatch(r"[a-z]+[0-9]?", r) for r in allowed)
    assert {"eastus", "westeurope", "northeurope", "australiaeast"} <= set(allowed)  # where most users deploy
    assert NOT_FLEX_REGIONS.isdisjoint(allowed)


def test_purge_protection_is_a_parameter_off_by_default_and_never_sent_as_false(main, parameters):
    param = main["parameters"]["keyVaultPurgeProtection"]
    assert param["type"] == "bool" and param["default"] is False
    assert parameters["parameters"]["keyVaultPurgeProtection"] == {"value": "${AZURE_KEY_VAULT_PURGE_PROTECTION=false}"}
    assert main["modules"]["keyVault"]["config"]["params"]["purgeProtection"] == "keyVaultPurgeProtection"
    vault = _resources(INFRA / "modules" / "key-vault.bicep")["Microsoft.KeyVault/vaults:vault"]["properties"]
    # Key Vault refuses enablePurgeProtection=false on a vault that has it; absent (null) leaves it off.
    assert vault["enablePurgeProtection"] == {"operator": {"type": "conditional", "operands": {
        "condition": "purgeProtection", "true_value": True, "false_value": None}}}
    assert vault["softDeleteRetentionInDays"] == 7


def test_key_vault_audits_every_secret_read_to_log_analytics(main):
    resources = _resources(INFRA / "modules" / "key-vault.bicep")
    setting = resources["Microsoft.Insights/diagnosticSettings:audit"]
    assert setting["scope"] == "vault"
    assert setting["properties"]["workspaceId"] == "workspaceId"
    assert {"category": "AuditEvent", "enabled": True} in setting["properties"]["logs"]
    assert main["modules"]["keyVault"]["config"]["params"]["workspaceId"] == accessor("monitoring", "outputs",
                                                                                         "workspaceId")
    monitoring = parse((INFRA / "modules" / "monitoring.bicep").read_text())
    assert monitoring["outputs"]["workspaceId"]["value"] == accessor("workspace", "id")


def test_the_deployers_data_access_is_a_parameter(main, parameters):
    param = main["parameters"]["deployerDataAccess"]
    assert param["type"] == "bool" and param["default"] is True
    assert parameters["parameters"]["deployerDataAccess"] == {"value": "${AZURE_DEPLOYER_DATA_ACCESS=true}"}
    # Without it the role module gets no user, and every user assignment is conditional on one.
    user = main["modules"]["roles"]["config"]["params"]["userPrincipalId"]
    assert user == {"operator": {"type": "conditional", "operands": {
        "condition": "deployerDataAccess", "true_value": "principalId", "false_value": ""}}}
    roles = parse(ROLE_ASSIGNMENTS.read_text())["resources"]
    user_assignments = {name: r["config"] for name, r in roles.items()
                        if r["type"] == "Microsoft.Authorization/roleAssignments"
                        and r["config"].get("config", r["config"])["properties"]["principalId"] == "userPrincipalId"}
    assert set(user_assignments) == {"userStorage", "userSecrets"}
    for name, config in user_assignments.items():
        assert config.get("condition") == {"operator": {"type": "not", "operands": {"bool_value": {
            "function": {"type": "empty", "parameters": {"item_to_test": "userPrincipalId"}}}}}}, name


def test_production_sizes_come_from_azd_variables(main, parameters):
    wired = {name: entry["value"] for name, entry in parameters["parameters"].items()}
    for param, variable in (("maximumInstanceCount", "AZURE_MAXIMUM_INSTANCE_COUNT"),
                            ("instanceMemoryMB", "AZURE_INSTANCE_MEMORY_MB"),
                            ("logDailyCapGb", "AZURE_LOG_DAILY_CAP_GB")):
        default = main["parameters"][param]["default"]
        assert wired[param] == f"${{{variable}={default}}}"


# --- alerts (infra/modules/alerts.bicep, infra/alerts/*.kql) ------------------------------------------

ALERTS = INFRA / "modules" / "alerts.bicep"
ALERT_QUERIES = INFRA / "alerts"
README = ROOT / "README.md"

# The relay's metrics (meter "relay", named in relay/telemetry.py) and the dimensions each carries.
RELAY_METRICS = {
    telemetry.WEBHOOKS: {"channel", "outcome", "status"},
    telemetry.MESSAGES_POSTED: {"channel", "outcome"},
    telemetry.REPLIES_DELIVERED: {"channel", "outcome"},
    telemetry.REPLY_LATENCY: {"channel"},
    telemetry.OUTBOX_AGE: {"channel"},
    telemetry.DEAD_LETTERS: {"channel", "kind"},
    telemetry.POLL_DURATION: {"outcome"},
    telemetry.POLL_CONVERSATIONS: {"outcome"},
    telemetry.POLL_TICKS: {"outcome"},
    telemetry.DIRECTLINE_ERRORS: {"operation", "status"},
    telemetry.TOKENS_REFRESHED: {"kind", "outcome"},
}

# The alerts issue #18 asks for, by rule name, and the metric each must watch.
ISSUE_ALERTS = {
    "dead-letters": telemetry.DEAD_LETTERS,
    "poller-failing": telemetry.POLL_TICKS,
    "poller-stopped": telemetry.POLL_TICKS,
    "outbox-age": telemetry.OUTBOX_AGE,
    "directline-throttled": telemetry.DIRECTLINE_ERRORS,
}

# What log search alert rules accept (Azure/bicep-types-az, Microsoft.Insights scheduledQueryRules@2023-12-01).
TIME_AGGREGATIONS = {"Average", "Count", "Maximum", "Minimum", "Total"}
OPERATORS = {"Equals", "GreaterThan", "GreaterThanOrEqual", "LessThan", "LessThanOrEqual"}


def alert_queries() -> dict[str, str]:
    """Each query file, by the path alerts.bicep loads it from."""
    return {f"../alerts/{path.name}": path.read_text() for path in sorted(ALERT_QUERIES.glob("*.kql"))}


def evaluate(node, scope: dict, queries: dict[str, str]):
    """A parsed expression with the loop item's fields (also in '${item.x}') and loadTextContent worked out
    (what these checks need); anything else stays as parsed."""
    if isinstance(node, list):
        return [evaluate(value, scope, queries) for value in node]
    if isinstance(node, str):  # '${item.title}' interpolations of the loop item
        return re.sub(r"\$\{(\w+)\.(\w+)\}", lambda m: str(scope[m[1]][m[2]]) if m[1] in scope else m[0], node)
    if not isinstance(node, dict):
        return node
    # An object literal may have keys of these names too (a condition's `operator: 'GreaterThan'`).
    operator = node["operator"] if isinstance(node.get("operator"), dict) else {}
    function = node["function"] if isinstance(node.get("function"), dict) else {}
    if operator.get("type") == "property_accessor" and operator["operands"]["operand_1"] in scope:
        return evaluate(scope[operator["operands"]["operand_1"]].get(operator["operands"]["operand_2"]), {}, queries)
    if function.get("type") == "load_text_content":
        return queries.get(function["parameters"]["file_path"], f"<no file {function['parameters']['file_path']}>")
    return {key: evaluate(value, scope, queries) for key, value in node.items()}


def alert_rules(module: dict, queries: dict[str, str]) -> dict[str, dict]:
    """The scheduledQueryRules the module makes (one resource looping over a variable of rules), by the name of
    their entry in that variable, worked out."""
    rules = {}
    for resource in module.get("resources", {}).values():
        if resource["type"] != "Microsoft.Insights/scheduledQueryRules":
            continue
        loop = resource["config"]["loop_type"]
        items = module["variables"][loop["detail"]["array_name"]]["value"]
        for item in items:
            rules[item["name"]] = evaluate(resource["config"]["config"], {loop["detail"]["item_name"]: item}, queries)
    return rules


def check_query(name: str, query: str, *, expected_metric: str | None) -> list[str]:
    """The query reads customMetrics for one metric of the contract, by its dimensions only."""
    problems = []
    if not query.startswith("customMetrics\n"):
        problems.append(f"{name}: the query must start from customMetrics (the relay's metrics in App Insights)")
    metrics = re.findall(r'\bname == "([^"]+)"', query)
    if len(metrics) != 1 or metrics[0] not in RELAY_METRICS:
        problems.append(f"{name}: the query names {metrics}, not one metric of the contract")
    elif expected_metric and metrics[0] != expected_metric:
        problems.append(f"{name}: the query watches {metrics[0]}, not {expected_metric}")
    else:
        for dimension in re.findall(r'customDimensions\["([^"]+)"\]', query):
            if dimension not in RELAY_METRICS[metrics[0]]:
                problems.append(f"{name}: {metrics[0]} has no dimension {dimension!r}")
    return problems


def check_alerts(module: dict, queries: dict[str, str]) -> list[str]:
    """Every alert of the issue exists, watches its metric in Application Insights and e-mails the
    action group whose receiver is the alertEmail parameter."""
    problems = []
    resources = module.get("resources", {})
    components = [name for name, r in resources.items()
                  if r["type"] == "Microsoft.Insights/components" and r["existing"]
                  and r["config"]["name"] == "applicationInsightsName"]
    groups = {name: r["config"] for name, r in resources.items() if r["type"] == "Microsoft.Insights/actionGroups"}
    if len(components) != 1:
        problems.append("the module must refer to the Application Insights component applicationInsightsName")
    if len(groups) != 1:
        problems.append(f"expected one action group, found {len(groups)}")
    for name, group in groups.items():
        receivers = group["properties"].get("emailReceivers") or []
        if group["properties"].get("enabled") is not True:
            problems.append(f"action group {name} must be enabled")
        if [r.get("emailAddress") for r in receivers] != ["alertEmail"]:
            problems.append(f"action group {name}'s e-mail receiver must be the alertEmail parameter")
    rules = alert_rules(module, queries)
    for name in ISSUE_ALERTS.keys() - rules.keys():
        problems.append(f"no alert rule {name}")
    for name, rule in rules.items():
        props = rule["properties"]
        if components and props.get("scopes") != [accessor(components[0], "id")]:
            problems.append(f"{name}: not scoped to the Application Insights component")
        if props.get("actions", {}).get("actionGroups") != [accessor(group, "id") for group in groups]:
            problems.append(f"{name}: not wired to the action group")
        criteria = props.get("criteria", {}).get("allOf") or [{}]
        if len(criteria) != 1:
            problems.append(f"{name}: a log search alert takes one condition")
        condition = criteria[0]
        problems += check_query(name, condition.get("query") or "", expected_metric=ISSUE_ALERTS.get(name))
        aggregation, column = condition.get("timeAggregation"), condition.get("metricMeasureColumn")
        if aggregation not in TIME_AGGREGATIONS or condition.get("operator") not in OPERATORS:
            problems.append(f"{name}: {aggregation} / {condition.get('operator')} is not a log alert condition")
        if (aggregation == "Count") != (column is None):
            problems.append(f"{name}: Count counts rows without a measure column; every other aggregation needs one")
        if column is not None and not re.search(rf"\b{column} = ", condition.get("query") or ""):
            problems.append(f"{name}: the query gives no column {column}")
        if not (isinstance(props.get("severity"), int) and 0 <= props["severity"] <= 4):
            problems.append(f"{name}: severity must be 0 (critical) to 4 (verbose)")
        for field in ("evaluationFrequency", "windowSize"):
            if not re.fullmatch(r"PT\d+[MH]", str(props.get(field))):
                problems.append(f"{name}: {field} must be an ISO 8601 duration")
    return problems


@pytest.fixture(scope="module")
def alerts() -> dict:
    return parse(ALERTS.read_text())


def test_each_alert_watches_its_metric_and_mails_the_action_group(alerts):
    assert check_alerts(alerts, alert_queries()) == []


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("    scopes: [\n      applicationInsights.id\n", "    scopes: [\n      actionGroup.id\n",
     "dead-letters: not scoped to the Application Insights component"),
    ("      actionGroups: [\n        actionGroup.id\n      ]\n", "      actionGroups: []\n",
     "outbox-age: not wired to the action group"),
    ("        emailAddress: alertEmail\n", "        emailAddress: 'ops@example.com'\n",
     "action group actionGroup's e-mail receiver must be the alertEmail parameter"),
    ("      metricMeasureColumn: 'throttled'\n", "      metricMeasureColumn: 'throttles'\n",
     "directline-throttled: the query gives no column throttles"),
    ("      timeAggregation: 'Count'\n", "      timeAggregation: 'Count'\n      metricMeasureColumn: 'ticks'\n",
     "poller-stopped: Count counts rows without a measure column"),
    ("    name: 'poller-stopped'\n", "    name: 'poller-quiet'\n", "no alert rule poller-stopped"),
    ("    severity: 3\n", "    severity: 5\n", "directline-throttled: severity must be"),
])
def test_the_alert_check_catches_a_miswired_rule(old, new, problem):
    text = ALERTS.read_text()
    mutated = text.replace(old, new, 1)
    assert mutated != text
    assert any(p.startswith(problem) for p in check_alerts(parse(mutated), alert_queries()))


@pytest.mark.parametrize(("file", "old", "new", "problem"), [
    ("dead-letters.kql", '"relay.dead_letters"', '"relay.deadletters"',
     "dead-letters: the query names ['relay.deadletters'], not one metric of the contract"),
    ("outbox-age.kql", '"relay.outbox.age"', '"relay.reply.latency"',
     "outbox-age: the query watches relay.reply.latency, not relay.outbox.age"),
    ("directline-throttled.kql", 'customDimensions["status"]', 'customDimensions["code"]',
     "directline-throttled: relay.directline.errors has no dimension 'code'"),
    ("poller-failing.kql", "customMetrics\n", "customEvents\n",
     "poller-failing: the query must start from customMetrics"),
])
def test_the_alert_check_catches_a_query_off_the_contract(alerts, file, old, new, problem):
    queries = alert_queries()
    path = f"../alerts/{file}"
    mutated = queries[path].replace(old, new, 1)
    assert mutated != queries[path]
    assert any(p.startswith(problem) for p in check_alerts(alerts, {**queries, path: mutated}))


def check_alerts_wiring(main: dict, parameters: dict) -> list[str]:
    """main.bicep makes the alerts only with an e-mail, for the Application Insights component the app
    sends to, and azd fills the e-mail and the 429 threshold from AZURE_ALERT_EMAIL and
    AZURE_ALERT_THROTTLE_THRESHOLD."""
    problems = []
    modules = [m for m in main["modules"].values() if m["detail"]["path"] == f"modules/{ALERTS.name}"]
    if len(modules) != 1:
        return [f"main.bicep must use modules/{ALERTS.name} once"]
    config = modules[0]["config"]
    if config.get("condition") != {"operator": {"type": "not", "operands": {"bool_value": {
            "function": {"type": "empty", "parameters": {"item_to_test": "alertEmail"}}}}}}:
        problems.append("the alerts module must be made only if (!empty(alertEmail))")
    params = config.get("config", config)["params"]
    wanted = {
        "alertEmail": "alertEmail",
        "directLineThrottleThreshold": "alertThrottleThreshold",
        "applicationInsightsName": accessor("monitoring", "outputs", "applicationInsightsName"),
    }
    problems += [f"the alerts module's {name} must be {value}" for name, value in wanted.items()
                 if params.get(name) != value]
    if main["parameters"].get("alertEmail", {}).get("default") != "":
        problems.append("parameter alertEmail must default to '' (no alerts)")
    threshold = main["parameters"].get("alertThrottleThreshold", {}).get("default")
    filled = {name: entry.get("value") for name, entry in parameters["parameters"].items()}
    if filled.get("alertEmail") != "${AZURE_ALERT_EMAIL}":
        problems.append("azd must fill alertEmail from AZURE_ALERT_EMAIL")
    if filled.get("alertThrottleThreshold") != f"${{AZURE_ALERT_THROTTLE_THRESHOLD={threshold}}}":
        problems.append(
            f"azd must fill alertThrottleThreshold from AZURE_ALERT_THROTTLE_THRESHOLD, default {threshold}")
    return problems


def test_the_alerts_are_made_with_an_e_mail_from_azd(main, parameters):
    assert check_alerts_wiring(main, parameters) == []


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("module alerts 'modules/alerts.bicep' = if (!empty(alertEmail)) {", "module alerts 'modules/alerts.bicep' = {",
     "the alerts module must be made only if"),
    ("    alertEmail: alertEmail\n", "    alertEmail: principalId\n", "the alerts module's alertEmail must be"),
    ("param alertThrottleThreshold int = 10", "param alertThrottleThreshold int = 20",
     "azd must fill alertThrottleThreshold from AZURE_ALERT_THROTTLE_THRESHOLD, default 20"),
])
def test_the_alerts_wiring_check_catches_a_miswired_module(parameters, old, new, problem):
    text = MAIN.read_text()
    mutated = text.replace(old, new, 1)
    assert mutated != text
    assert any(p.startswith(problem) for p in check_alerts_wiring(parse(mutated), parameters))


def readme_queries(readme: str) -> list[str]:
    """The text of every ```kusto block of the README."""
    return [block.rstrip("\n") for block in re.findall(r"^```kusto\n(.*?)^```$", readme, re.M | re.S)]


def check_readme_shows_queries(readme: str, queries: dict[str, str]) -> list[str]:
    shown = readme_queries(readme)
    return [f"README.md does not show {path.removeprefix('../')} verbatim in a ```kusto block"
            for path, query in queries.items() if query.rstrip("\n") not in shown]


def test_the_readme_shows_each_alert_query_verbatim():
    assert check_readme_shows_queries(README.read_text(), alert_queries()) == []


def check_readme_alert_table(readme: str, rules: dict[str, dict]) -> list[str]:
    """The README's table of alerts gives each rule's title, severity, frequency and window as the Bicep has them."""
    problems = []
    for rule in rules.values():
        props = rule["properties"]
        title = props["displayName"].rsplit(": ", 1)[-1]
        minutes = [int(props[field][2:-1]) for field in ("evaluationFrequency", "windowSize")]
        row = f"| {title} | {props['severity']} ("
        line = next((line for line in readme.splitlines() if line.startswith(row)), None)
        if line is None:
            problems.append(f"README.md's alert table has no row {row}...")
        elif f" | {minutes[0]} / {minutes[1]} minutes | " not in line:
            problems.append(f"README.md's row for {title} must say it runs every {minutes[0]} / looks back "
                            f"{minutes[1]} minutes")
    return problems


def test_the_readme_alert_table_matches_the_rules(alerts):
    assert check_readme_alert_table(README.read_text(), alert_rules(alerts, alert_queries())) == []


def test_the_readme_alert_table_check_catches_a_changed_rule():
    text = ALERTS.read_text()
    for old, new, problem in (
            ("    severity: 3\n", "    severity: 2\n",
             "README.md's alert table has no row | Direct Line throttling | 2 ("),
            ("    windowSize: 'PT15M'\n", "    windowSize: 'PT30M'\n",
             "README.md's row for dead letters must say it runs every 5 / looks back 30 minutes")):
        mutated = text.replace(old, new, 1)
        assert mutated != text
        rules = alert_rules(parse(mutated), alert_queries())
        assert any(p.startswith(problem) for p in check_readme_alert_table(README.read_text(), rules)), problem


def test_the_readme_check_catches_a_query_that_drifted():
    readme = README.read_text()
    queries = alert_queries()
    path = "../alerts/outbox-age.kql"
    drifted = {**queries, path: queries[path].replace("valueMax", "valueSum")}
    assert drifted[path] != queries[path]
    assert check_readme_shows_queries(readme, drifted) == [
        "README.md does not show alerts/outbox-age.kql verbatim in a ```kusto block"]


# --- what telemetry needs: host.json and app settings (/work/notes/ops18-otel-facts.md) -----------------

# The Functions Python worker configures the Azure Monitor distro itself when these are "true": without
# the identity's credential (local auth is off), with every library instrumented (URLs carry ids), and a
# second time beside relay/telemetry.py's own configuration. The relay configures it; these stay unset.
WORKER_TELEMETRY_SETTINGS = ("PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY", "PYTHON_ENABLE_OPENTELEMETRY")


def check_telemetry_settings(settings: dict[str, object], host: dict) -> list[str]:
    problems = []
    if host.get("telemetryMode") != "OpenTelemetry":
        problems.append('host.json must set "telemetryMode": "OpenTelemetry" (the host exports with OpenTelemetry)')
    if settings.get("APPLICATIONINSIGHTS_CONNECTION_STRING") != accessor("applicationInsights", "properties",
                                                                         "ConnectionString"):
        problems.append("APPLICATIONINSIGHTS_CONNECTION_STRING must be the component's connection string")
    if settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING") != "ClientId=${identityClientId};Authorization=AAD":
        problems.append("APPLICATIONINSIGHTS_AUTHENTICATION_STRING must name the user-assigned identity")
    problems += [f"{name} must not be set: the relay configures telemetry itself"
                 for name in WORKER_TELEMETRY_SETTINGS if name in settings]
    return problems


def test_telemetry_has_what_it_needs_from_host_json_and_app_settings(main, function_app):
    settings = provisioned_app_settings(main, function_app, [])
    assert check_telemetry_settings(settings, json.loads((ROOT / "host.json").read_text())) == []
    # The app sends to the component monitoring.bicep makes, whose identity may publish to it.
    assert main["modules"]["app"]["config"]["params"]["applicationInsightsName"] == accessor(
        "monitoring", "outputs", "applicationInsightsName")
    roles = parse(ROLE_ASSIGNMENTS.read_text())["resources"]["identityTelemetry"]["config"]
    assert roles["scope"] == "applicationInsights"
    assert roles["properties"]["roleDefinitionId"]["function"]["parameters"]["resource_name_1"] == accessor(
        "roles", "monitoringMetricsPublisher")


def test_the_telemetry_check_catches_a_missing_mode_and_a_worker_setting(main, function_app):
    host = json.loads((ROOT / "host.json").read_text())
    settings = provisioned_app_settings(main, function_app, [])
    assert check_telemetry_settings(settings, {k: v for k, v in host.items() if k != "telemetryMode"}) == [
        'host.json must set "telemetryMode": "OpenTelemetry" (the host exports with OpenTelemetry)']
    text = FUNCTION_APP.read_text()
    mutated = text.replace("  AZURE_CLIENT_ID: identityClientId\n", "  AZURE_CLIENT_ID: identityClientId\n"
                           "  PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'\n")
    assert mutated != text
    settings = provisioned_app_settings(main, parse(mutated), [])
    assert check_telemetry_settings(settings, host) == [
        "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY must not be set: the relay configures telemetry itself"]
    settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] = "Authorization=AAD"
    assert "APPLICATIONINSIGHTS_AUTHENTICATION_STRING must name the user-assigned identity" in check_telemetry_settings(
        settings, host)
