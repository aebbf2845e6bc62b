"""The services `fleet up` starts and supervises: Kafka, the schema registry, Mosquitto and the
platform's own processes."""
