"""peewee-migrate settings for its command line (`pw_migrate`)."""

# An open peewee-migrate issue otherwise emits an empty `basemodel` table.
IGNORE = ["basemodel"]
