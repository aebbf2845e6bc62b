/*
 * fleetstream's subscribe ACL for Mosquitto 2.0 (a version 5 plugin; built and loaded by
 * infra/services/mosquitto.py).
 *
 * Mosquitto 2.0's acl_file grants every SUBSCRIBE (security_default.c: "FIXME - implement ACL
 * subscription strings") and checks only at delivery. A device subscribed to the bridges'
 * `$share/ingest/...` group then takes its round-robin share, which the delivery check drops:
 * lost. This plugin refuses (MQTT 5 reason 0x87) any SUBSCRIBE of a device outside its own
 * subtree `<subtree_prefix><username>` (the filter itself or below it), so `#`, `$SYS/#`,
 * another device's topics and every `$share/...` filter are refused at subscribe time.
 * Platform identities (plugin_opt_platform_identities, comma-separated) and an allowed filter
 * are deferred: the next plugin and the acl_file decide exactly as without this plugin.
 *
 * The broker passes the whole filter, `$share/<group>/` included (handle_subscribe.c), and
 * calls plugins in the order of their `plugin` lines, before the acl_file.
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

struct subscribe_acl {
	char *prefix;     /* "devices/" */
	char **platform;  /* identities deferred to the other checks */
	int platform_count;
	mosquitto_plugin_id_t *id;
};

static bool is_platform(const struct subscribe_acl *acl, const char *username)
{
	for(int i = 0; i < acl->platform_count; i++){
		if(!strcmp(acl->platform[i], username)) return true;
	}
	return false;
}

/* `filter` is `<prefix><username>` or below it. Device ids hold no `+`, `#` or `/`
 * (infra/pki.py), so a literal prefix compare is exact. */
static bool in_own_subtree(const char *prefix, const char *username, const char *filter)
{
	size_t plen = strlen(prefix);
	size_t ulen = strlen(username);
	if(strncmp(filter, prefix, plen)) return false;
	if(strncmp(filter + plen, username, ulen)) return false;
	return filter[plen + ulen] == '\0' || filter[plen + ulen] == '/';
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const struct subscribe_acl *acl = userdata;
	(void)event;

	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	const char *username = mosquitto_client_username(ed->client);
	if(username == NULL || ed->topic == NULL) return MOSQ_ERR_ACL_DENIED;
	if(is_platform(acl, username)) return MOSQ_ERR_PLUGIN_DEFER;
	if(in_own_subtree(acl->prefix, username, ed->topic)) return MOSQ_ERR_PLUGIN_DEFER;
	mosquitto_log_printf(MOSQ_LOG_DEBUG, "subscribe ACL: %s refused '%s'", username, ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

static void acl_free(struct subscribe_acl *acl)
{
	if(acl == NULL) return;
	for(int i = 0; i < acl->platform_count; i++) free(acl->platform[i]);
	free(acl->platform);
	free(acl->prefix);
	free(acl);
}

static int parse_platform(struct subscribe_acl *acl, const char *value)
{
	char *copy = strdup(value);
	char *saveptr = NULL;
	if(copy == NULL) return MOSQ_ERR_NOMEM;
	for(char *name = strtok_r(copy, ",", &saveptr); name; name = strtok_r(NULL, ",", &saveptr)){
		char **grown = realloc(acl->platform, sizeof(char *) * (size_t)(acl->platform_count + 1));
		if(grown == NULL){
			free(copy);
			return MOSQ_ERR_NOMEM;
		}
		acl->platform = grown;
		acl->platform[acl->platform_count] = strdup(name);
		if(acl->platform[acl->platform_count] == NULL){
			free(copy);
			return MOSQ_ERR_NOMEM;
		}
		acl->platform_count++;
	}
	free(copy);
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	(void)supported_version_count;
	(void)supported_versions;
	return 5;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct subscribe_acl *acl = calloc(1, sizeof(*acl));
	if(acl == NULL) return MOSQ_ERR_NOMEM;
	acl->id = identifier;
	for(int i = 0; i < option_count; i++){
		int rc = MOSQ_ERR_SUCCESS;
		if(!strcmp(options[i].key, "subtree_prefix")){
			free(acl->prefix);
			acl->prefix = strdup(options[i].value);
			if(acl->prefix == NULL) rc = MOSQ_ERR_NOMEM;
		}else if(!strcmp(options[i].key, "platform_identities")){
			rc = parse_platform(acl, options[i].value);
		}
		if(rc != MOSQ_ERR_SUCCESS){
			acl_free(acl);
			return rc;
		}
	}
	if(acl->prefix == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "subscribe ACL: plugin_opt_subtree_prefix is required");
		acl_free(acl);
		return MOSQ_ERR_INVAL;
	}
	*userdata = acl;
	return mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, acl);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct subscribe_acl *acl = userdata;
	(void)options;
	(void)option_count;
	if(acl == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(acl->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	acl_free(acl);
	return MOSQ_ERR_SUCCESS;
}
